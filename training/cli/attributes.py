"""The attribute commands of ``reid-train``: train-attributes, evaluate-attributes, predict-attributes."""

from __future__ import annotations

import csv
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from training.cli.options import (
    DataRoot,
    fail,
    parse_size,
    parse_steps,
    prepare_config,
    require_data_root,
    resolve_init_weights,
    user_errors,
)


def train_attributes(
    data_root: DataRoot = None,
    layout: Annotated[str | None, typer.Option(help="auto | course | original")] = None,
    backbone: Annotated[str | None, typer.Option(help="resnet50 | mobilenet_v2 | osnet_x0_25")] = None,
    init_weights: Annotated[
        str | None,
        typer.Option(
            help="State-dict file, 'imagenet' (torchvision download), 'none', or a re-ID bundle folder "
            "(its backbone: e.g. --backbone osnet_x0_25 --init-weights models_store/reid-256x128)."
        ),
    ] = None,
    input_size: Annotated[str | None, typer.Option(help="HEIGHTxWIDTH, default 256x128.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs (default 100).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default 128.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 1e-4).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default 5e-4.")] = None,
    lr_steps: Annotated[
        str | None, typer.Option(help="Epochs at which the lr is divided by 10, e.g. 8,12 (default none).")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Early stop after N epochs without improving --monitor.")
    ] = None,
    monitor: Annotated[
        str | None,
        typer.Option(
            help="Validation value that picks the best epoch and drives early stopping: val_loss "
            "(the report's, default), mean_accuracy or mA (maximised); epoch keeps the last epoch "
            "(the schedule run to its end, as --train-all does)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    amp: Annotated[
        bool | None,
        typer.Option(
            "--amp/--no-amp", help="Mixed precision: fp16 on CUDA, bf16 on a CPU that has it (default on)."
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Threads for decoding images into the cache.")] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch CPU threads (default: one per core; 1 is faster on a busy machine)."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/attributes-<time>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run in --run-dir.")
    ] = False,
    split_file: Annotated[
        Path | None, typer.Option(help="Split JSON to reuse (written there if missing).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the split, init and shuffling (default 0).")
    ] = None,
    limit_ids: Annotated[int | None, typer.Option(help="Train on this many identities (quick runs).")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Decoded-image cache folder (default ./cache).")
    ] = None,
    class_weights: Annotated[
        str | None,
        typer.Option(help="majority (the report's: majority count / class count) | sqrt (its root) | none"),
    ] = None,
    id_loss_weight: Annotated[
        float | None,
        typer.Option(
            help="APR: weight of an identity cross-entropy on the pooled features, trained alongside "
            "the heads and dropped at export (0: off, the default)."
        ),
    ] = None,
    last_stride: Annotated[
        int | None,
        typer.Option(help="1 halves the last downsampling: a final map twice as tall and wide (slower)."),
    ] = None,
    stripes: Annotated[
        int | None,
        typer.Option(
            help="Also pool N horizontal stripes of the final map for the heads, beside the global "
            "average (0: global only, the default; 2: upper and lower body)."
        ),
    ] = None,
    max_pool: Annotated[
        bool | None,
        typer.Option(
            "--max-pool/--no-max-pool",
            help="Also pool the final map's global max for the heads (small items: hat, handbag).",
        ),
    ] = None,
    erase_p: Annotated[
        float | None, typer.Option(help="Random-erasing probability of the training crops (default 0.5).")
    ] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option(
            help="Label smoothing of the heads' training loss (default 0; validation loss unsmoothed)."
        ),
    ] = None,
    train_all: Annotated[
        bool | None,
        typer.Option(
            "--train-all",
            help="Train on every identity, the split's validation ones too (for a shipped bundle; no "
            "per-epoch validation, the last epoch is kept; export with --metrics-from the split run's "
            "bundle).",
        ),
    ] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bars.")] = None,
) -> None:
    """Train the 12-head attribute classifier; writes the run directory (config, metrics, best.pt, plots)."""
    from app.attribute_schema import ATTRIBUTE_GROUPS  # noqa: F401  (fail early if app/ is missing)
    from training.config import AttributeTrainConfig
    from training.engine import Trainer, keep_freed_memory, seed_everything
    from training.tasks.attributes import AttributeTask, finish_attribute_run, load_attribute_data

    options = {
        "data_root": str(data_root) if data_root else None,
        "layout": layout,
        "backbone": backbone,
        "init_weights": (
            resolve_init_weights(init_weights, bundles=True) if init_weights is not None else None
        ),
        "input_size": parse_size(input_size) if input_size else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "lr_steps": parse_steps(lr_steps) if lr_steps is not None else None,
        "patience": patience,
        "monitor": monitor,
        "monitor_mode": (None if monitor is None else "min" if monitor.endswith("loss") else "max"),
        "device": device,
        "amp": amp,
        "workers": workers,
        "threads": threads,
        "split_file": str(split_file) if split_file else None,
        "seed": seed,
        "limit_ids": limit_ids,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "class_weights": class_weights,
        "id_loss_weight": id_loss_weight,
        "last_stride": last_stride,
        "stripes": stripes,
        "max_pool": max_pool,
        "erase_p": erase_p,
        "label_smoothing": label_smoothing,
        "train_all": train_all,
        "progress": progress,
    }
    try:
        if not resume:
            require_data_root(data_root)
            run_dir = run_dir or Path("runs") / f"attributes-{datetime.now():%Y%m%d-%H%M%S}"
        config = prepare_config(AttributeTrainConfig, options, run_dir, resume)
        run_dir = Path(config.run_dir)
        trainer = Trainer(config, run_dir)
        if trainer.device.type == "cpu":
            keep_freed_memory()
        typer.echo(f"run {run_dir} on {trainer.device} ({trainer.precision})", err=True)
        seed_everything(config.seed)
        data = load_attribute_data(config, run_dir)
        typer.echo(
            f"data {config.layout} layout: {len(data.train)} train / {len(data.val)} val images, "
            f"{len(data.split.train_ids)} / {len(data.split.val_ids)} identities",
            err=True,
        )
        task = AttributeTask(config, data, device=trainer.device, channels_last=trainer.channels_last)
        result = trainer.fit(task, resume=resume)
        final = finish_attribute_run(task, run_dir)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    val = final["validation"]
    typer.echo(
        f"best epoch {result.best_epoch}: val_loss {val['val_loss']:.4f}, mean accuracy "
        f"{val['mean_accuracy']:.4f}, mA {val['mA']:.4f}, instance F1 {val['instance_f1']:.4f}"
    )
    typer.echo(f"report: {run_dir / 'report.md'}\nexport: reid-train export {run_dir}")


def evaluate_attributes(
    run_dir: Annotated[Path, typer.Argument(help="An attribute run directory (with best.pt).")],
    data_root: DataRoot = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Decoded-image cache folder.")] = None,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: one per core).")] = 0,
) -> None:
    """Re-evaluate a run's best checkpoint on its validation split: rewrites val_metrics.json (with the
    logit-adjustment trade-off), the plots and report.md, as at the end of training."""
    from training.config import AttributeTrainConfig
    from training.engine import CONFIG_FILE, keep_freed_memory
    from training.tasks.attributes import (
        AttributeTask,
        build_attribute_net,
        finish_attribute_run,
        load_attribute_data,
    )

    keep_freed_memory()
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        config = AttributeTrainConfig.load(run_dir / CONFIG_FILE)
        overrides = {"data_root": str(data_root)} if data_root else {}
        if cache_dir:
            overrides["cache_dir"] = str(cache_dir)
        config = config.replace(progress=False, **overrides)
        data = load_attribute_data(config, run_dir)
        # The weights come from best.pt, so the network starts empty (no init download or bundle).
        empty = build_attribute_net(config.replace(init_weights=None))
        task = AttributeTask(config, data, model=empty)
        final = finish_attribute_run(task, run_dir)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    val = final["validation"]
    typer.echo(f"epoch {final['best_epoch']}: mean accuracy {val['mean_accuracy']:.4f}, mA {val['mA']:.4f}")
    for row in final["logit_adjustment"]["tradeoff"]:
        typer.echo(
            f"  logit adjustment tau {row['tau']:g}: "
            f"mean accuracy {row['mean_accuracy']:.4f}, mA {row['mA']:.4f}"
        )
    typer.echo(f"report: {run_dir / 'report.md'}")


def predict_attributes(
    bundle: Annotated[Path, typer.Option(help="Attribute bundle directory.")],
    images: Annotated[Path, typer.Option(help="Folder of images (jpg/png).")],
    out: Annotated[Path, typer.Option(help="CSV to write, in annotations_train.csv's format.")],
    neighbours_from: Annotated[
        Path | None,
        typer.Option(
            help="A re-ID bundle: average each crop's class probabilities with those of its nearest crops "
            "in the folder (its other views of the same person; docs/models.md). The attribute bundle's "
            "recorded rule (neighbour_smoothing, from evaluate-neighbours) applies where it has one."
        ),
    ] = None,
    neighbours: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --neighbours-from: crops averaged in (default: the recorded rule's, else 20)."
        ),
    ] = None,
    min_similarity: Annotated[
        float | None,
        typer.Option(
            help="With --neighbours-from: neighbours less similar weigh nothing (default: the recorded "
            "rule's, else 0)."
        ),
    ] = None,
    batch_size: int = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 2,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: one per core).")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Predict the attributes of every image of a folder; one CSV row per image, id = file name."""
    from training.batch_inference import open_for_prediction
    from training.data.market import list_images

    try:
        manifest, model = open_for_prediction(bundle, "attributes", threads, device)
        paths = list_images(images)
        if not paths:
            raise ValueError(f"no images in {images}")
        started = time.perf_counter()
        kwargs = {"batch_size": batch_size, "device": device, "workers": workers, "progress": progress}
        scores = predict_logits(model, paths, manifest.input_size, **kwargs)
        if neighbours_from is not None:
            reid, embeddings = embed_folder(neighbours_from, paths, threads, kwargs)
            scores, rule = neighbour_scores(scores, manifest, embeddings, neighbours, min_similarity)
            typer.echo(f"{rule} (neighbours by {reid.name} {reid.version})", err=True)
        count = write_predictions(scores, paths, out)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    seconds = time.perf_counter() - started
    typer.echo(f"{out}: {count} rows in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s)")


def predict_logits(
    model: Any,
    paths: list[Path],
    size: tuple[int, int],
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode (threads, one batch ahead) and classify ``paths``: per group, the (N, classes) logits."""
    import numpy as np

    from training.batch_inference import model_inputs

    inputs = model_inputs(
        model, paths, size, batch_size=batch_size, device=device, workers=workers, progress=progress
    )
    parts: dict[str, list[Any]] = {}
    for net, _, x in inputs:
        for name, value in net(x).items():
            parts.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def embed_folder(bundle: Path, paths: list[Path], threads: int, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A re-ID bundle's manifest and its (N, D) embeddings of ``paths`` (its ONNX graph on the CPU)."""
    from training.batch_inference import open_for_prediction
    from training.cli.reid_predict import embed_files

    reid, model = open_for_prediction(bundle, "reid", threads, kwargs["device"])
    return reid, embed_files(model, paths, reid.input_size, desc="neighbours", **kwargs).numpy()


def neighbour_scores(
    scores: dict[str, Any],
    manifest: Any,
    embeddings: Any,
    neighbours: int | None = None,
    min_similarity: float | None = None,
) -> tuple[dict[str, Any], str]:
    """The scores averaged over each crop's nearest crops by ``embeddings``, with the rule recorded in
    the attribute bundle (``neighbour_smoothing``: neighbours, similarity floor, per-group taus) where
    it has one and the arguments leave it; and a line that says which rule was applied."""
    from training.attribute_neighbours import (
        ALPHA,
        NEIGHBOURS,
        adjust,
        nearest_neighbours,
        smoothed_log_probs,
    )

    spec = manifest.neighbour_smoothing
    k = neighbours or (spec.neighbours if spec else NEIGHBOURS)
    floor = min_similarity if min_similarity is not None else (spec.min_similarity if spec else 0.0)
    alpha = spec.alpha if spec else ALPHA
    indices, sims = nearest_neighbours(embeddings, k)
    smoothed = smoothed_log_probs(scores, indices, sims, alpha, floor)
    line = f"{k} neighbours above similarity {floor:.3f}, weights similarity^{alpha:g}"
    if spec is None:
        return smoothed, f"{line}; no recorded rule, no logit adjustment"
    if not spec.taus:
        return smoothed, f"{line}; the rule validated with {spec.reid_bundle}, no re-chosen taus"
    return adjust(smoothed, spec.taus, spec.log_priors), f"{line}; taus re-chosen with {spec.reid_bundle}"


def write_predictions(scores: dict[str, Any], paths: list[Path], out: Path) -> int:
    """One CSV row per path: each group's highest-scoring class; returns the row count."""
    from app.attribute_schema import ATTRIBUTE_GROUPS, CSV_COLUMNS, row_from_labels

    preds = {g.name: scores[g.name].argmax(1).tolist() for g in ATTRIBUTE_GROUPS}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for i, path in enumerate(paths):
            writer.writerow(row_from_labels({name: p[i] for name, p in preds.items()}, path.name))
    return len(paths)
