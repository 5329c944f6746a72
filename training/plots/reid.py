"""Re-ID figures as PNG: t-SNE of the largest identities, CMC curves, ranked lists.

- :func:`plot_tsne`: the report's figure, the embeddings of the 10 identities with the most images
  projected to 2-D with t-SNE (scikit-learn), one colour per identity.
- :func:`plot_cmc`: CMC curves (rank-k accuracy against k), e.g. with and without re-ranking.
- :func:`plot_ranked_lists`: one row per query: the query, then its top 10 gallery images under the
  Market-1501 protocol (same identity and camera left out, as the metrics do), framed green when
  they show the query's identity and red when not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

GREEN = (0, 170, 0)
RED = (220, 0, 0)


def largest_identities(pids: Sequence[int], n: int = 10) -> list[int]:
    """The ``n`` identities with the most images (ties broken by smaller pid)."""
    ids, counts = np.unique(np.asarray(pids), return_counts=True)
    order = np.lexsort((ids, -counts))
    return [int(i) for i in ids[order][:n]]


def plot_tsne(
    features: torch.Tensor | np.ndarray,
    pids: Sequence[int],
    path: str | Path,
    *,
    n_ids: int = 10,
    seed: int = 0,
    title: str = "t-SNE of the 10 identities with the most images",
) -> Path:
    from sklearn.manifold import TSNE

    feats = np.asarray(features, dtype=np.float32)
    pids = np.asarray(pids)
    chosen = largest_identities(pids, n_ids)
    mask = np.isin(pids, chosen)
    x, y = feats[mask], pids[mask]
    perplexity = float(min(30, max(2, len(x) // 4)))
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10")
    for i, pid in enumerate(chosen):
        sel = y == pid
        ax.scatter(points[sel, 0], points[sel, 1], s=14, color=cmap(i % 10), label=f"{pid} ({sel.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title="identity (images)", fontsize=7, title_fontsize=8, loc="best", markerscale=1.5)
    return _save(fig, path)


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, *, max_rank: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, cmc in curves.items():
        cmc = list(cmc)[:max_rank]
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, cmc, marker="o", markersize=3, label=f"{label} (rank-1 {cmc[0]:.3f})")
    ax.set_xlabel("rank k")
    ax.set_ylabel("matching rate (CMC)")
    ax.set_ylim(0, 1.01)
    ax.set_xlim(1, max_rank)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("CMC curve (Market-1501 protocol)")
    return _save(fig, path)


def _framed(
    image: torch.Tensor | np.ndarray, colour: tuple[int, int, int] | None, width: int = 3
) -> np.ndarray:
    """A (3, H, W) uint8 image as (H, W, 3), with a coloured frame drawn inside its border."""
    img = np.asarray(image).transpose(1, 2, 0).copy()
    if colour is not None:
        img[:width], img[-width:], img[:, :width], img[:, -width:] = colour, colour, colour, colour
    return img


def ranked_lists(
    distmat: np.ndarray,
    q_pids: Sequence[int],
    g_pids: Sequence[int],
    q_camids: Sequence[int],
    g_camids: Sequence[int],
    top: int = 10,
) -> list[np.ndarray]:
    """Per query, the gallery positions of its first ``top`` results under the Market-1501 protocol."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    out = []
    for i in range(len(distmat)):
        order = np.argsort(distmat[i], kind="stable")
        drop = ((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])) | (g_pids[order] == -1)
        out.append(order[~drop][:top])
    return out


def plot_ranked_lists(
    query_images: torch.Tensor,
    gallery_images: torch.Tensor,
    distmat: np.ndarray,
    q_pids: Sequence[int],
    g_pids: Sequence[int],
    q_camids: Sequence[int],
    g_camids: Sequence[int],
    path: str | Path,
    *,
    n_queries: int = 8,
    top: int = 10,
    seed: int = 0,
) -> Path:
    """``n_queries`` random queries (seeded), each with its top ``top`` results framed green / red."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(distmat), size=min(n_queries, len(distmat)), replace=False))
    lists = ranked_lists(
        distmat[rows], np.asarray(q_pids)[rows], g_pids, np.asarray(q_camids)[rows], g_camids, top
    )
    g_pids = np.asarray(g_pids)
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(1.0 * (top + 1), 2.0 * len(rows)), squeeze=False)
    for r, (qi, ranked) in enumerate(zip(rows, lists, strict=True)):
        q_pid = int(np.asarray(q_pids)[qi])
        axes[r, 0].imshow(_framed(query_images[qi], None))
        axes[r, 0].set_title(f"query {q_pid}", fontsize=7)
        for c in range(top):
            ax = axes[r, c + 1]
            if c < len(ranked):
                gi = int(ranked[c])
                ok = int(g_pids[gi]) == q_pid
                ax.imshow(_framed(gallery_images[gi], GREEN if ok else RED))
                ax.set_title(f"{c + 1}: {1 - distmat[qi, gi]:.2f}", fontsize=6)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(
        "Ranked lists: top results, green = same identity, red = other (label: rank: cosine)", fontsize=8
    )
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
