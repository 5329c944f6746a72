"""Commands over the Market-1501 folder itself: split (shared by both tasks) and data-stats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from training.cli.options import DataRoot, Layout, fail, require_data_root, user_errors


def split(
    out: Annotated[Path, typer.Option(help="Split JSON to write.")],
    data_root: DataRoot = None,
    layout: Layout = "auto",
    val_fraction: Annotated[float, typer.Option(help="Share of identities for validation.")] = 0.2,
    seed: int = 0,
    limit_ids: Annotated[int | None, typer.Option(help="Split only this many identities.")] = None,
) -> None:
    """Write an identity-disjoint, stratified train/validation split (reused by both tasks)."""
    from training.data.market import load_market
    from training.data.split import coverage_gaps, split_identities

    try:
        data = load_market(require_data_root(data_root), layout).limit_train_ids(limit_ids, seed)
        labels = {pid: data.attributes.get(pid, {}) for pid in data.train_ids}
        result = split_identities(labels, val_fraction, seed, data.fingerprint)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    result.save(out)
    train, val = result.partition(data.train)
    typer.echo(
        f"{out}: {len(result.train_ids)} / {len(result.val_ids)} identities, "
        f"{len(train)} / {len(val)} images (train / validation)"
    )
    gaps = coverage_gaps(result, labels)
    if gaps:
        typer.echo(f"classes on one side only (too few identities): {', '.join(gaps)}")


def data_stats(
    out: Annotated[Path, typer.Option(help="Folder for class_balance.png and class_counts.json.")] = Path(
        "data_stats"
    ),
    data_root: DataRoot = None,
    layout: Layout = "auto",
) -> None:
    """Class balance of every attribute group over the training identities (the report's Figure 1)."""
    from training.data.market import load_market
    from training.plots.attributes import plot_class_balance
    from training.tasks.attributes import class_counts

    try:
        data = load_market(require_data_root(data_root), layout)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    counts = class_counts([data.attributes[p] for p in data.train_ids])
    out.mkdir(parents=True, exist_ok=True)
    (out / "class_counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    plot_class_balance(counts, out / "class_balance.png", unit=f"{len(data.train_ids)} identities")
    from app.attribute_schema import GROUPS_BY_NAME

    typer.echo(f"{data.layout} layout: {len(data.train)} images, {len(data.train_ids)} identities")
    for name, values in counts.items():
        classes = GROUPS_BY_NAME[name].classes
        typer.echo(f"{name:>14}: " + ", ".join(f"{c} {v}" for c, v in zip(classes, values, strict=True)))
    typer.echo(f"wrote {out / 'class_balance.png'} and {out / 'class_counts.json'}")
