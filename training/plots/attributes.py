"""Attribute figures as PNG: class imbalance per group (the report's Figure 1), confusion matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from app.attribute_schema import ATTRIBUTE_GROUPS


def plot_class_balance(
    counts: Mapping[str, Sequence[int]], path: str | Path, *, unit: str = "identities"
) -> Path:
    """One bar chart per group (4 x 3 grid), classes on the x axis, counts on top of the bars."""
    path = Path(path)
    groups = [g for g in ATTRIBUTE_GROUPS if g.name in counts]
    cols = 3
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.1 * rows), dpi=100, squeeze=False)
    for ax, g in zip(axes.flat, groups, strict=False):
        values = list(counts[g.name])
        colours = ["tab:blue" if v == max(values) else "tab:orange" for v in values]
        bars = ax.bar(range(len(values)), values, color=colours)
        ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(values)), g.classes, rotation=40 if len(values) > 2 else 0, ha="right" if
                      len(values) > 2 else "center", fontsize=8)  # fmt: skip
        ax.set_title(g.name, fontsize=10)
        ax.set_ylim(0, max(values) * 1.18 + 1)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"Class balance per attribute ({unit}; blue = majority class)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (colour = recall share), with the counts written in the cells."""
    path = Path(path)
    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = 2.2 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tradeoff(rows: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Mean accuracy against mA as logit adjustment's tau grows (one labelled point per tau)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    x, y = [r["mean_accuracy"] for r in rows], [r["mA"] for r in rows]
    ax.plot(x, y, "o-", color="tab:blue")
    for r in rows:
        ax.annotate(f"tau {r['tau']:g}", (r["mean_accuracy"], r["mA"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("mean accuracy (12 groups)")
    ax.set_ylabel("mA (mean balanced accuracy)")
    ax.set_title("Logit adjustment: accuracy against balanced accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
