"""Training curves: chosen per-epoch metrics against the epoch, one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_curves(
    history: Sequence[dict[str, Any]], path: str | Path, keys: Sequence[str], *, title: str = ""
) -> Path:
    """One line per key present in the history (``metrics.json`` records); returns the path."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [r["epoch"] for r in history]
    for key in keys:
        values = [r.get(key) for r in history]
        if any(isinstance(v, int | float) for v in values):
            ax.plot(
                epochs,
                [v if isinstance(v, int | float) else float("nan") for v in values],
                marker="o",
                label=key,
            )
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
