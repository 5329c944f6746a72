"""The re-ID prediction command of ``reid-train``: predict-reid ranks a gallery folder for each query."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from training.cli.options import fail, user_errors

Opt = typer.Option


def predict_reid(
    bundle: Annotated[Path, Opt(help="Re-ID bundle directory.")],
    queries: Annotated[Path, Opt(help="Folder of query images.")],
    gallery: Annotated[Path, Opt(help="Folder of gallery images.")],
    out: Annotated[Path, Opt(help="Text file: one line 'QUERY.jpg: G1.jpg, G2.jpg, ...' per query.")],
    top: Annotated[int | None, Opt(help="Only the N most similar gallery images (default: all).")] = None,
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 128,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "cpu",
    workers: Annotated[int, Opt(help="Decoding threads.")] = 2,
    threads: Annotated[int, Opt(help="Torch CPU threads (0: one per core).")] = 0,
    rerank: Annotated[
        bool,
        Opt(
            "--rerank",
            help="Rank by k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) instead of cosine similarity; "
            "memory grows with queries x gallery, not with their square.",
        ),
    ] = False,
    flip: Annotated[
        bool,
        Opt(
            "--flip",
            help="Average each crop's embedding with its mirror image's (twice the embedding time; "
            "docs/models.md measures the gain).",
        ),
    ] = False,
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Rank the gallery for every query by cosine similarity (or re-ranking), most similar first."""
    from training.batch_inference import open_for_prediction
    from training.data.market import list_images

    try:
        manifest, model = open_for_prediction(bundle, "reid", threads, device)
        q_paths, g_paths = list_images(queries), list_images(gallery)
        if not q_paths or not g_paths:
            raise ValueError(f"no images in {queries if not q_paths else gallery}")
        started = time.perf_counter()
        kwargs = {
            "batch_size": batch_size,
            "device": device,
            "workers": workers,
            "progress": progress,
            "flip": flip,
        }
        q_emb = embed_files(model, q_paths, manifest.input_size, desc="queries", **kwargs)
        g_emb = embed_files(model, g_paths, manifest.input_size, desc="gallery", **kwargs)
        embedded = time.perf_counter()
        distances = None
        if rerank:
            from training.evaluation.rerank import re_ranking_sparse

            distances = re_ranking_sparse(q_emb.numpy(), g_emb.numpy())
            typer.echo(f"re-ranked {len(q_paths)} x {len(g_paths)} in {time.perf_counter() - embedded:.1f} s")
        write_rankings(out, q_paths, g_paths, q_emb, g_emb, top=top, progress=progress, distances=distances)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    done = time.perf_counter()
    n = len(q_paths) + len(g_paths)
    typer.echo(
        f"{out}: {len(q_paths)} queries x {len(g_paths)} gallery images; embedding "
        f"{embedded - started:.1f} s ({n / max(embedded - started, 1e-9):.0f} images/s), "
        f"ranking and writing {done - embedded:.1f} s"
    )


def embed_files(
    model: Any,
    paths: list[Path],
    size: tuple[int, int],
    *,
    batch_size: int = 128,
    device: str = "cpu",
    workers: int = 2,
    progress: bool = True,
    desc: str = "embed",
    flip: bool = False,
) -> Any:
    """Decode (threads, one batch ahead) and embed ``paths``; returns an (N, D) float32 CPU tensor,
    L2-normalised (``flip``: the normalised mean of the crop's and its mirror image's embeddings)."""
    import torch
    import torch.nn.functional as F

    from training.batch_inference import model_inputs

    inputs = model_inputs(
        model,
        paths,
        size,
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress,
        desc=desc,
    )

    def forward(net: Any, x: Any) -> Any:
        emb = F.normalize(net(x).float(), dim=1)
        if flip:
            emb = F.normalize(emb + F.normalize(net(x.flip(-1)).float(), dim=1), dim=1)
        return emb.cpu()

    return torch.cat([forward(net, x) for net, _, x in inputs])


def write_rankings(
    out: Path,
    q_paths: list[Path],
    g_paths: list[Path],
    q_emb: Any,
    g_emb: Any,
    *,
    top: int | None = None,
    chunk: int = 256,
    progress: bool = True,
    distances: Any = None,
) -> None:
    """One line per query, gallery file names by decreasing cosine similarity (ties: gallery order), or by
    increasing ``distances`` (a (Q, G) array, e.g. re-ranked) when given."""
    import numpy as np
    from tqdm import tqdm

    names = np.asarray([p.name for p in g_paths], dtype=object)
    n = len(g_paths) if top is None else min(top, len(g_paths))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for start in tqdm(range(0, len(q_paths), chunk), desc="rank", unit="chunk", disable=not progress):
            if distances is None:
                sim = (q_emb[start : start + chunk] @ g_emb.T).numpy()
            else:
                sim = -np.asarray(distances[start : start + chunk])
            if n < len(g_paths):  # the top n only: partition first, then sort those
                part = np.argpartition(-sim, n - 1, axis=1)[:, :n]
                inner = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
                order = np.take_along_axis(part, inner, 1)
            else:
                order = np.argsort(-sim, axis=1, kind="stable")
            for row, q in zip(order, q_paths[start : start + chunk], strict=True):
                fh.write(f"{q.name}: {', '.join(names[row])}\n")
