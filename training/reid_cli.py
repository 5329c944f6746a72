"""The re-ID commands of ``reid-train``: train-reid, evaluate-reid, ablation, predict-reid.

``training/cli.py`` calls :func:`register` to add them to its typer app; they reuse its helpers
(``--input-size HxW``, ``--init-weights``, ``--resume``, one-line errors), imported inside the commands
so that either module can be imported first.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

Opt = typer.Option
DataRoot = Annotated[
    Path | None,
    Opt("--data-root", envvar="REID_DATA_ROOT", help="Market-1501 folder (course or original layout)."),
]


def _train_options(
    *,
    data_root: Path | None,
    layout: str | None,
    backbone: str | None,
    init_weights: str | None,
    input_size: str | None,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    weight_decay: float | None,
    patience: int | None,
    monitor: str | None,
    device: str | None,
    workers: int | None,
    threads: int | None,
    split_file: Path | None,
    seed: int | None,
    limit_ids: int | None,
    cache_dir: Path | None,
    progress: bool | None,
    loss_lambda: float | None,
    margin: float | None,
    id_loss: bool | None,
    label_smoothing: float | None,
    p: int | None,
    k: int | None,
    branch_dim: int | None,
    last_stride: int | None,
    erase_p: float | None,
    train_all: bool | None,
    distractors: Path | None,
    distractor_every: int | None,
    amp: bool | None,
) -> dict[str, Any]:
    from training.cli import parse_size, resolve_init_weights

    return {
        "data_root": str(data_root) if data_root else None,
        "layout": layout,
        "backbone": backbone,
        "init_weights": resolve_init_weights(init_weights) if init_weights is not None else None,
        "input_size": parse_size(input_size) if input_size else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "patience": patience,
        "monitor": monitor,
        "monitor_mode": None if monitor is None else "min" if monitor.endswith("loss") else "max",
        "device": device,
        "workers": workers,
        "threads": threads,
        "split_file": str(split_file) if split_file else None,
        "seed": seed,
        "limit_ids": limit_ids,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "progress": progress,
        "loss_lambda": loss_lambda,
        "margin": margin,
        "id_loss": id_loss,
        "label_smoothing": label_smoothing,
        "p": p,
        "k": k,
        "branch_dim": branch_dim,
        "last_stride": last_stride,
        "erase_p": erase_p,
        "train_all": train_all,
        "distractors": str(distractors) if distractors else None,
        "distractor_every": distractor_every,
        "amp": amp,
    }


def run_training(
    recipe: str, options: dict[str, Any], run_dir: Path | None, resume: bool, rerank: bool
) -> tuple[Any, dict[str, Any], Path]:
    """Build the config (recipe + options, or the saved one on resume), train, evaluate the best epoch."""
    from training.cli import prepare_config, require_data_root
    from training.engine import Trainer, keep_freed_memory, seed_everything
    from training.tasks.reid import ReIDTask, ReIDTrainConfig, finish_reid_run, load_reid_data

    if resume:
        config = prepare_config(ReIDTrainConfig, options, run_dir, resume=True)
    else:
        require_data_root(Path(options["data_root"]) if options.get("data_root") else None)
        run_dir = run_dir or Path("runs") / f"reid-{recipe}-{datetime.now():%Y%m%d-%H%M%S}"
        given = {k: v for k, v in options.items() if v is not None}
        config = ReIDTrainConfig.from_recipe(recipe, **given, run_dir=str(run_dir))
    run_dir = Path(config.run_dir)
    trainer = Trainer(config, run_dir)
    if trainer.device.type == "cpu":
        keep_freed_memory()
    typer.echo(
        f"run {run_dir}: recipe {config.recipe}, {config.backbone} on {trainer.device} ({trainer.precision})",
        err=True,
    )
    seed_everything(config.seed)
    data = load_reid_data(config, run_dir)
    ids = len(set(data.train_pids.tolist()))
    seen = " (seen in training: --train-all)" if config.train_all else ""
    typer.echo(
        f"data {config.layout} layout: {len(data.train)} train images of {ids} identities, "
        f"{len(data.val)} validation images of {len(data.split.val_ids)}{seen}",
        err=True,
    )
    task = ReIDTask(config, data, device=trainer.device, channels_last=trainer.channels_last)
    result = trainer.fit(task, resume=resume)
    final = finish_reid_run(task, run_dir, rerank=rerank)
    final["history"] = result.history
    return config, final, run_dir


def _print_metrics(val: dict[str, Any]) -> None:
    typer.echo(
        f"rank-1 {val['rank1']:.4f}, rank-5 {val['rank5']:.4f}, rank-10 {val['rank10']:.4f}, "
        f"mAP {val['mAP']:.4f}, mINP {val['mINP']:.4f}, course mAP@80 {val['map80']:.4f}; "
        f"match threshold {val['match_threshold']:.4f} (cosine, 1% false matches)"
    )
    if "query_expansion" in val:
        qe = val["query_expansion"]
        typer.echo(
            f"query expansion ({qe['neighbours']} neighbours): rank-1 {qe['rank1']:.4f}, "
            f"mAP {qe['mAP']:.4f}, "
            f"mINP {qe['mINP']:.4f}; match threshold {qe['match_threshold']:.4f}"
        )
    if "unlabelled_threshold" in val:
        est = val["unlabelled_threshold"]
        typer.echo(
            f"match threshold estimated on the {est['crops']} distractor crops alone: "
            f"{est['match_threshold']:.4f}, with query expansion {est['match_threshold_expanded']:.4f}"
        )
    if "track_queries" in val:
        tr = val["track_queries"]
        typer.echo(
            f"track queries (each query's identity-and-camera images averaged): rank-1 {tr['rank1']:.4f}, "
            f"mAP {tr['mAP']:.4f}, mINP {tr['mINP']:.4f}"
        )
    if "rerank" in val:
        rr = val["rerank"]
        typer.echo(
            f"re-ranked: rank-1 {rr['rank1']:.4f}, mAP {rr['mAP']:.4f}, mINP {rr['mINP']:.4f} "
            f"in {rr['rerank_seconds']:.2f} s, peak {rr['rerank_peak_mb']:.0f} MB"
        )


_NOT_OPTIONS = {"recipe", "rerank", "run_dir", "resume"}  # train_reid's parameters that are not config


def train_reid(
    data_root: DataRoot = None,
    recipe: Annotated[
        str, Opt(help="report (triplets, margin 10, Adam 1e-4) | modern (P x K, batch-hard).")
    ] = ("modern"),
    layout: Annotated[str | None, Opt(help="auto | course | original")] = None,
    backbone: Annotated[str | None, Opt(help="resnet50 | mobilenet_v2 | osnet_x0_25")] = None,
    init_weights: Annotated[
        str | None, Opt(help="State-dict file, 'imagenet' (torchvision download) or 'none'.")
    ] = None,
    input_size: Annotated[str | None, Opt(help="HEIGHTxWIDTH, default 256x128.")] = None,
    epochs: Annotated[int | None, Opt(help="Most epochs (report 25, modern 60).")] = None,
    batch_size: Annotated[int | None, Opt(help="Anchors per batch for the report recipe (32).")] = None,
    lr: Annotated[float | None, Opt(help="Adam learning rate (report 1e-4, modern 3.5e-4).")] = None,
    weight_decay: Annotated[float | None, Opt(help="Default 5e-4.")] = None,
    patience: Annotated[
        int | None, Opt(help="Early stop after N epochs without improving --monitor.")
    ] = None,
    monitor: Annotated[
        str | None,
        Opt(
            help="Validation value that picks the best epoch and drives early stopping: val_loss "
            "(minimised; the report recipe's), mAP (the modern recipe's), rank1, mINP or map80 (maximised)."
        ),
    ] = None,
    loss_lambda: Annotated[float | None, Opt("--lambda", help="Weight of every loss term (0.5).")] = None,
    margin: Annotated[float | None, Opt(help="Triplet margin (report 10, modern 0.3).")] = None,
    id_loss: Annotated[
        bool | None, Opt("--id-loss/--no-id-loss", help="Identity cross-entropy terms.")
    ] = None,
    label_smoothing: Annotated[float | None, Opt(help="ID-loss label smoothing (modern 0.1).")] = None,
    p: Annotated[int | None, Opt("--p", help="Identities per P x K batch (16).")] = None,
    k: Annotated[int | None, Opt("--k", help="Images per identity in a P x K batch (4).")] = None,
    branch_dim: Annotated[int | None, Opt(help="Reduce each branch to this size (embedding = 2x).")] = None,
    last_stride: Annotated[int | None, Opt(help="1 keeps the last stage at stride 16 (slower).")] = None,
    erase_p: Annotated[float | None, Opt(help="Random-erasing probability (modern 0.5).")] = None,
    train_all: Annotated[
        bool | None,
        Opt(
            "--train-all",
            help="Train on every identity, the split's validation ones too (for a shipped bundle; "
            "no per-epoch validation, the last epoch is kept).",
        ),
    ] = None,
    distractors: Annotated[
        Path | None,
        Opt(
            help="Folder of other people's crops (the course test/) added to the validation gallery "
            "every --distractor-every epochs: the protocol that predicts a real test."
        ),
    ] = None,
    distractor_every: Annotated[int | None, Opt(help="Epochs between distractor validations (10).")] = None,
    rerank: Annotated[bool, Opt("--rerank", help="Also evaluate with k-reciprocal re-ranking.")] = False,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda")] = None,
    amp: Annotated[
        bool | None,
        Opt("--amp/--no-amp", help="Mixed precision: fp16 on CUDA, bf16 on a CPU that has it (default on)."),
    ] = None,
    workers: Annotated[int | None, Opt(help="Threads for decoding images into the cache.")] = None,
    threads: Annotated[
        int | None, Opt(help="Torch CPU threads (default: one per core; 1 is faster on a busy machine).")
    ] = None,
    run_dir: Annotated[Path | None, Opt(help="Run directory (default runs/reid-<recipe>-<time>).")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the interrupted run in --run-dir.")] = False,
    split_file: Annotated[Path | None, Opt(help="Split JSON to reuse (written there if missing).")] = None,
    seed: Annotated[int | None, Opt(help="Seed of the split, init and sampling (default 0).")] = None,
    limit_ids: Annotated[int | None, Opt(help="Use only this many identities (quick runs).")] = None,
    cache_dir: Annotated[Path | None, Opt(help="Decoded-image cache folder (default ./cache).")] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help="Progress bars.")] = None,
) -> None:
    """Train the two-branch re-ID network; writes the run directory (config, metrics, best.pt, plots)."""
    # First statement, so locals() holds only the parameters.
    options = _train_options(**{k_: v for k_, v in locals().items() if k_ not in _NOT_OPTIONS})
    from training.cli import fail, user_errors

    try:
        _, final, run_dir = run_training(recipe, options, run_dir, resume, rerank)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    typer.echo(f"best epoch {final['best_epoch']}:")
    _print_metrics(final["validation"])
    typer.echo(f"report: {run_dir / 'report.md'}\nexport: reid-train export {run_dir}")


def evaluate_reid(
    source: Annotated[Path, typer.Argument(help="A re-ID run directory or bundle directory.")],
    out: Annotated[
        Path | None, Opt(help="Folder for the metrics JSON and plots (default SOURCE/eval).")
    ] = None,
    protocol: Annotated[
        str, Opt(help="validation (the split's validation identities) | market-test (original layout).")
    ] = "validation",
    data_root: DataRoot = None,
    split_file: Annotated[
        Path | None, Opt(help="Split JSON (default: the run's split.json / the bundle's recorded split).")
    ] = None,
    rerank: Annotated[bool, Opt("--rerank", help="Also evaluate with k-reciprocal re-ranking.")] = False,
    distractors: Annotated[
        Path | None,
        Opt(
            help="Folder of crops of other people added to the validation gallery (e.g. the course "
            "test/ folder): the protocol that predicts a real test. Evaluated after the plain one."
        ),
    ] = None,
    record: Annotated[
        bool,
        Opt(
            "--record",
            help="SOURCE is a bundle: write what was measured into its manifest (the distractor "
            "protocol's metrics, and the query-expansion section the service uses); weights unchanged.",
        ),
    ] = False,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 256,
    cache_dir: Annotated[Path | None, Opt(help="Decoded-image cache folder.")] = None,
    threads: Annotated[int, Opt(help="Torch CPU threads (0: one per core).")] = 0,
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Metrics and plots of a run's best checkpoint or of a bundle: the validation protocol of training
    (with --distractors also against a gallery of distractors), or the official Market-1501
    query/gallery test (original layout only)."""
    from training.cli import fail, user_errors

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        if protocol not in ("validation", "market-test"):
            raise ValueError(f"--protocol must be validation or market-test, got {protocol!r}")
        if distractors is not None and protocol != "validation":
            raise ValueError("--distractors extends the validation protocol; market-test has its own")
        results = evaluate_source(
            source,
            out,
            protocol,
            data_root,
            split_file,
            rerank,
            device,
            batch_size,
            cache_dir,
            progress,
            distractors=distractors,
        )
    except user_errors() as exc:
        raise fail(str(exc)) from None
    for result in results:
        typer.echo(f"{result['name']}:")
        _print_metrics(result["metrics"])
        typer.echo(f"wrote {result['file']}")
    if record:
        try:
            typer.echo(f"recorded in {record_in_manifest(source, results)}")
        except user_errors() as exc:
            raise fail(str(exc)) from None


def record_in_manifest(bundle: Path, results: list[dict[str, Any]]) -> Path:
    """Write evaluated metrics into a re-ID bundle's manifest (not its weights); returns the manifest."""
    from app.bundle import MANIFEST, QueryExpansionSpec, read_manifest, write_manifest
    from training.tasks.reid import query_expansion_spec

    if not (bundle / MANIFEST).is_file():
        raise ValueError(f"--record needs a bundle directory; {bundle} has no {MANIFEST}")
    manifest = read_manifest(bundle)
    by_name = {r["name"]: r["metrics"] for r in results}
    if "validation" not in by_name:
        raise ValueError("--record needs the validation protocol")
    estimate = next(
        (m["unlabelled_threshold"] for m in by_name.values() if "unlabelled_threshold" in m), None
    )
    if manifest.training_config.get("train_all"):
        return _record_thresholds(bundle, manifest, estimate)
    scalars = {
        name: {k: v for k, v in m.items() if isinstance(v, int | float)}
        for name, m in by_name.items()
        if name != "validation"
    }
    if estimate is not None:  # next to the labelled thresholds, to judge the estimate
        scalars.setdefault("validation_distractors", {})["unlabelled_threshold"] = estimate
    others = {k: v for k, v in by_name.items() if k != "validation"}
    update: dict[str, Any] = {"metrics": {**manifest.metrics, **scalars}}
    if "query_expansion" in by_name["validation"]:
        spec = query_expansion_spec(by_name["validation"], **others)
        update["query_expansion"] = QueryExpansionSpec.model_validate(spec)
    write_manifest(bundle, manifest.model_copy(update=update))
    return bundle / MANIFEST


def _record_thresholds(bundle: Path, manifest: Any, estimate: dict[str, Any] | None) -> Path:
    """A bundle trained on every identity keeps its split run's metrics; only its own thresholds,
    estimated on the distractor crops, are recorded."""
    from app.bundle import MANIFEST, write_manifest

    if estimate is None:
        raise ValueError(
            f"{bundle} was trained on every identity (its validation identities were seen): --record "
            "needs --distractors, on whose crops its match thresholds are estimated"
        )
    source = f"estimated on {estimate['crops']} unlabelled crops (evaluate-reid --distractors)"
    update: dict[str, Any] = {
        "match_threshold": estimate["match_threshold"],
        "metrics": {**manifest.metrics, "match_threshold_source": source},
    }
    if manifest.query_expansion is not None:
        update["query_expansion"] = manifest.query_expansion.model_copy(
            update={"match_threshold": estimate["match_threshold_expanded"]}
        )
    write_manifest(bundle, manifest.model_copy(update=update))
    return bundle / MANIFEST


def evaluate_source(
    source: Path,
    out: Path | None,
    protocol: str,
    data_root: Path | None,
    split_file: Path | None,
    rerank: bool,
    device: str,
    batch_size: int,
    cache_dir: Path | None,
    progress: bool,
    *,
    distractors: Path | None = None,
) -> list[dict[str, Any]]:
    """Load a run's best model or a bundle, build the evaluation set(s), evaluate, write outputs."""
    import tempfile

    from app.bundle import MANIFEST
    from app.nets.bundles import build_network, load_bundle
    from training.data.market import load_market
    from training.engine import BEST, CONFIG_FILE, load_checkpoint, resolve_device
    from training.tasks.reid import (
        ReIDTrainConfig,
        load_reid_data,
        market_test_set,
        with_distractors,
        write_reid_outputs,
    )

    target = resolve_device(device)
    if (source / MANIFEST).is_file():
        manifest, model = load_bundle(source, device=str(target))
        if manifest.task != "reid":
            raise ValueError(f"{source} is a {manifest.task} bundle, not a re-ID bundle")
        if manifest.onnx is not None and target.type == "cpu":
            from training.onnx_export import OnnxModule

            model = OnnxModule(source)  # what the service runs; the torch network stays the reference
        config = ReIDTrainConfig.from_dict(manifest.training_config)
        recorded = Path(config.run_dir) / "split.json" if config.run_dir else None
    elif (source / BEST).is_file():
        config = ReIDTrainConfig.load(source / CONFIG_FILE)
        ckpt = load_checkpoint(source / BEST)
        model = build_network("reid", ckpt["architecture"])
        model.load_state_dict(ckpt["model"])
        model.to(target)
        recorded = source / "split.json"
    else:
        raise FileNotFoundError(f"{source}: neither a bundle ({MANIFEST}) nor a run directory ({BEST})")
    config = config.replace(
        data_root=str(data_root) if data_root else config.data_root,
        cache_dir=str(cache_dir) if cache_dir else config.cache_dir,
        progress=progress,
        data_fingerprint="",  # evaluating on other data is allowed; the fingerprint is reported
    )
    if protocol == "market-test":
        data = load_market(config.data_root, "auto")
        eval_set = market_test_set(
            data, config.input_size, config.cache_dir or None, workers=config.workers, progress=progress
        )
        config.data_fingerprint = data.fingerprint
    else:
        split = split_file or (recorded if recorded is not None and recorded.is_file() else None)
        if split is None:  # the split is deterministic in (data, seed, fraction): recompute it
            typer.echo("no recorded split found: recomputing it from the data, seed and fraction", err=True)
        config.split_file = str(split) if split else None
        if split_file:  # an explicit split names the identities to evaluate: no --limit-ids subset
            config.limit_ids = None
        with tempfile.TemporaryDirectory() as scratch:  # resolve_split writes a copy; keep it out of SOURCE
            eval_set = load_reid_data(config, scratch).validation_set(config.eval_seed)
    sets = [eval_set]
    if distractors is not None:
        sets.append(
            with_distractors(
                eval_set, distractors, config.input_size, config.cache_dir or None, progress=progress
            )
        )
    out = out or source / "eval"
    results = []
    for current in sets:
        result = write_reid_outputs(
            model, current, out, device=target, batch_size=batch_size, rerank=rerank, progress=progress
        )
        result["source"] = str(source)
        result["data_fingerprint"] = config.data_fingerprint
        name = current.name
        file = out / ("val_metrics.json" if name == "validation" else f"{name}_metrics.json")
        file.write_text(json.dumps(result, indent=1) + "\n")
        results.append({**result, "name": name, "metrics": result[name], "out": out, "file": file})
    return results


def ablation(
    out: Annotated[Path, Opt(help="Folder for the two runs and ablation.md.")] = Path("runs/ablation"),
    data_root: DataRoot = None,
    recipe: Annotated[str, Opt(help="Recipe of both runs (the report's Table 1 used 'report').")] = "report",
    backbone: Annotated[str | None, Opt(help="resnet50 | mobilenet_v2 | osnet_x0_25")] = None,
    init_weights: Annotated[str | None, Opt(help="State-dict file, 'imagenet' or 'none'.")] = None,
    input_size: Annotated[str | None, Opt(help="HEIGHTxWIDTH, default 256x128.")] = None,
    epochs: Annotated[
        int | None, Opt(help="Most epochs per run (fewer than the recipe's for a quick table).")
    ] = None,
    limit_ids: Annotated[int | None, Opt(help="Use only this many identities (a subset).")] = None,
    split_file: Annotated[Path | None, Opt(help="Split JSON to reuse.")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda")] = None,
    threads: Annotated[int | None, Opt(help="Torch CPU threads (default: one per core).")] = None,
    seed: Annotated[int | None, Opt(help="Seed (default 0).")] = None,
    cache_dir: Annotated[Path | None, Opt(help="Decoded-image cache folder.")] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress")] = None,
) -> None:
    """The report's Table 1: the same training with and without the identity loss; writes ablation.md."""
    from training.cli import fail, parse_size, resolve_init_weights, user_errors

    rows = []
    try:
        for with_id in (False, True):
            options = {
                "data_root": str(data_root) if data_root else None,
                "backbone": backbone,
                "init_weights": resolve_init_weights(init_weights) if init_weights is not None else None,
                "input_size": parse_size(input_size) if input_size else None,
                "epochs": epochs,
                "limit_ids": limit_ids,
                "split_file": str(split_file) if split_file else str(out / "split.json"),
                "device": device,
                "threads": threads,
                "seed": seed,
                "cache_dir": str(cache_dir) if cache_dir else None,
                "progress": progress,
                "id_loss": with_id,
            }
            run = out / ("with_id_loss" if with_id else "no_id_loss")
            config, final, _ = run_training(recipe, options, run, resume=False, rerank=False)
            rows.append((with_id, config, final))
    except user_errors() as exc:
        raise fail(str(exc)) from None
    table = ablation_table(rows)
    (out / "ablation.md").write_text(table)
    typer.echo(table)


def ablation_table(rows: list[tuple[bool, Any, dict[str, Any]]]) -> str:
    """Markdown in the shape of the report's Table 1, with the setting it was measured in."""
    config = rows[0][1]
    first = rows[0][2]
    lines = [
        "# Ablation: the identity loss (the report's Table 1)",
        "",
        f"Recipe `{config.recipe}`, backbone `{config.backbone}`, input {config.input_size[0]}x"
        f"{config.input_size[1]}, init `{config.init_weights}`, at most {config.epochs} epochs "
        f"(early stopping on `{config.monitor}`, patience {config.patience}), "
        + (f"a subset of {config.limit_ids} identities" if config.limit_ids else "all training identities")
        + f": {first['identities']['train']} training / {first['identities']['val']} validation identities "
        f"(the same split for both rows). The report trained up to 25 epochs on all identities.",
        "",
        "| | mAP@80 (report's metric) | mAP (Market) | rank-1 | mINP | train loss | validation loss "
        "| best epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| report: no ID loss | 0.64 | | | | 0.01670 | 0.01563 | |",
        "| report: with ID loss | 0.81 | | | | 0.01931 | 0.17935 | |",
    ]
    for with_id, _, final in rows:
        val = final["validation"]
        best = next(r for r in final["history"] if r["epoch"] == final["best_epoch"])
        lines.append(
            f"| ours: {'with' if with_id else 'no'} ID loss | {val['map80_all_cameras']:.4f} "
            f"| {val['mAP']:.4f} | {val['rank1']:.4f} | {val['mINP']:.4f} | {best['train_loss']:.5f} "
            f"| {best['val_loss']:.5f} | {final['best_epoch']} |"
        )
    lines += [
        "",
        "mAP@80 here keeps same-camera matches, as the report's evaluation did (a random 10% of validation "
        "images as queries); mAP, rank-1 and mINP follow the Market-1501 protocol (same identity and "
        "camera excluded). Losses are lambda-weighted sums at the best epoch; the validation loss holds "
        "only the triplet terms (validation identities have no classifier outputs), so it is not "
        "comparable with the report's.",
        "",
    ]
    return "\n".join(lines)


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
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Rank the gallery for every query by cosine similarity (or re-ranking), most similar first."""
    from training.batch_inference import open_bundle
    from training.cli import fail, user_errors
    from training.data.market import list_images

    try:
        manifest, model = open_bundle(bundle, "reid", threads)
        if manifest.onnx is not None and device == "cpu":
            from training.onnx_export import OnnxModule

            model = OnnxModule(bundle, threads)  # what the service runs, about 5x faster on a CPU
        q_paths, g_paths = list_images(queries), list_images(gallery)
        if not q_paths or not g_paths:
            raise ValueError(f"no images in {queries if not q_paths else gallery}")
        started = time.perf_counter()
        kwargs = {"batch_size": batch_size, "device": device, "workers": workers, "progress": progress}
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
) -> Any:
    """Decode (threads, one batch ahead) and embed ``paths``; returns an (N, D) float32 CPU tensor."""
    import torch

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
    out = [net(x).float().cpu() for net, _, x in inputs]
    return torch.cat(out)


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


def register(app: typer.Typer) -> None:
    """Add the re-ID commands to ``reid-train``."""
    app.command("train-reid")(train_reid)
    app.command("evaluate-reid")(evaluate_reid)
    app.command("ablation")(ablation)
    app.command("predict-reid")(predict_reid)
