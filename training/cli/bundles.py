"""The bundle commands of ``reid-train``: export (run -> bundle), flip-bundle, ensemble-bundle and
add-onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.cli.options import fail, user_errors

Store = Annotated[Path, typer.Option(help="Folder of bundles.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")]


def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished (or interrupted) run directory.")],
    store: Store = Path("models_store"),
    name: Annotated[
        str | None, typer.Option(help="Bundle name (default: the task, 'attributes' or 'reid').")
    ] = None,
    half: Annotated[bool, typer.Option("--half", help="Store the weights in float16.")] = False,
    force: Force = False,
    logit_adjust: Annotated[
        str,
        typer.Option(
            help="Attribute runs: logit adjustment tau, one of the run's report.md trade-off table "
            "(0 = most accurate, 1 = most balanced), or 'per-group' (each group's tau chosen on "
            "validation); folded into the heads' biases."
        ),
    ] = "0",
    metrics_from: Annotated[
        Path | None,
        typer.Option(
            help="Runs trained with --train-all: the bundle of the same recipe's split run, whose "
            "validation metrics (re-ID: and thresholds; attributes: and decision rule) the manifest "
            "carries."
        ),
    ] = None,
) -> None:
    """Write the run's best checkpoint as a bundle: manifest.json, weights.safetensors, model.onnx."""
    from app.bundle import read_manifest
    from training.export import export_run

    try:
        directory = export_run(
            run_dir,
            store=store,
            name=name,
            half=half,
            force=force,
            logit_adjust=logit_adjust,
            metrics_from=metrics_from,
        )
    except user_errors() as exc:
        raise fail(str(exc)) from None
    manifest = read_manifest(directory)
    typer.echo(f"{directory}: {manifest.task} bundle, {manifest.backbone}, version {manifest.version}")
    if manifest.onnx:
        typer.echo(f"  ONNX graph {manifest.onnx.file}: max |onnx - torch| {manifest.onnx.max_abs_diff:.2g}")


def flip_bundle(
    source: Annotated[Path, typer.Argument(help="A re-ID bundle (e.g. models_store/reid-256x128).")],
    name: Annotated[str, typer.Option(help="Name of the new bundle (e.g. reid-flip).")],
    store: Store = Path("models_store"),
    force: Force = False,
    metrics_from: Annotated[
        Path | None,
        typer.Option(
            help="Bundles trained with --train-all: the flipped bundle of the same recipe's split run, "
            "whose validation the new manifest carries."
        ),
    ] = None,
) -> None:
    """A re-ID bundle with test-time flip: each crop and its mirror image embedded and averaged (twice
    the inference cost), as a new bundle version of the same weights; evaluate it with --record."""
    from app.bundle import read_manifest
    from training.export import flip_bundle as write_flipped

    try:
        directory = write_flipped(source, store=store, name=name, force=force, metrics_from=metrics_from)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    manifest = read_manifest(directory)
    assert manifest.onnx is not None
    typer.echo(
        f"{directory}: re-ID bundle with test-time flip, version {manifest.version}; "
        f"ONNX graph max |onnx - torch| {manifest.onnx.max_abs_diff:.2g}"
    )


def ensemble_bundle(
    members: Annotated[
        list[Path],
        typer.Argument(
            help="Re-ID bundles, the one with the largest input first (e.g. models_store/reid-256x128 "
            "models_store/reid-128x64)."
        ),
    ],
    name: Annotated[str, typer.Option(help="Name of the new bundle.")],
    weight: Annotated[
        list[float] | None,
        typer.Option(help="Each member's weight, in order (normalised to sum 1; default equal)."),
    ] = None,
    store: Store = Path("models_store"),
    force: Force = False,
    metrics_from: Annotated[
        Path | None,
        typer.Option(
            help="Members trained with --train-all: the ensemble of the same recipes' split runs, whose "
            "validation the new manifest carries."
        ),
    ] = None,
) -> None:
    """Several re-ID bundles as one: each embeds the crop at its own input size and the weighted
    embeddings are concatenated (the members' costs add up); evaluate it with --record."""
    from app.bundle import read_manifest
    from training.ensemble import ensemble_bundle as write_ensemble

    weights = weight or [1.0] * len(members)
    try:
        directory = write_ensemble(
            members, weights, store=store, name=name, force=force, metrics_from=metrics_from
        )
    except user_errors() as exc:
        raise fail(str(exc)) from None
    manifest = read_manifest(directory)
    assert manifest.onnx is not None and manifest.embedding is not None
    typer.echo(
        f"{directory}: re-ID ensemble of {len(members)} bundles ({manifest.backbone}), "
        f"{manifest.embedding.dim}-d embedding, version {manifest.version}; "
        f"ONNX graph max |onnx - torch| {manifest.onnx.max_abs_diff:.2g}"
    )


def add_onnx(
    bundles: Annotated[list[Path], typer.Argument(help="Bundle directories (e.g. models_store/reid).")],
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).", min=17)] = 18,
    tolerance: Annotated[
        float, typer.Option(help="Largest |onnx - torch| accepted on the check batch.")
    ] = 1e-4,
) -> None:
    """Add (or replace) the ONNX graph of existing bundles, from their own weights; no retraining."""
    from training.onnx_export import add_onnx as write_graph

    for bundle in bundles:
        try:
            manifest = write_graph(bundle, opset=opset, tolerance=tolerance)
        except user_errors() as exc:
            raise fail(str(exc)) from None
        assert manifest.onnx is not None
        typer.echo(
            f"{bundle / manifest.onnx.file}: opset {opset}, outputs {len(manifest.onnx.outputs)}, "
            f"max |onnx - torch| {manifest.onnx.max_abs_diff:.2g} on {manifest.onnx.check_batch} crops"
        )
