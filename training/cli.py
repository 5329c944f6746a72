"""``reid-train``: train, evaluate, export and apply the models from the command line.

Commands: ``train-attributes``, ``split``, ``data-stats``, ``export``, ``add-onnx``,
``predict-attributes``; the re-ID
task registers its own commands (see the marked spot at the end of this file). Every data option reads
``--data-root`` or the environment variable ``REID_DATA_ROOT``; nothing points at a fixed location.
"""

from __future__ import annotations

import csv
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="reid-train",
    help="Train, evaluate and export the pedestrian-attribute and re-ID models (Market-1501).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root", envvar="REID_DATA_ROOT", help="Market-1501 folder (course or original layout)."
    ),
]
Layout = Annotated[str, typer.Option(help="auto | course | original")]


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's to fix: printed as one line, no traceback."""
    from app.bundle import BundleError
    from app.nets.backbones import WeightsUnavailableError
    from app.preprocess import ImageError
    from training.data.market import DataError
    from training.engine import RunExistsError
    from training.export import ExportError
    from training.onnx_export import OnnxExportError

    return (
        BundleError, WeightsUnavailableError, ImageError, DataError, RunExistsError, ExportError,
        OnnxExportError, FileNotFoundError, KeyError, ValueError,
    )  # fmt: skip


def parse_size(text: str) -> tuple[int, int]:
    """``256x128`` -> (256, 128): height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH such as 256x128, got {text!r}") from None
    return height, width


def parse_steps(text: str) -> tuple[int, ...]:
    """'8,12' -> (8, 12); empty text -> ()."""
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected epochs separated by commas such as 8,12, got {text!r}") from None
    if any(step < 1 for step in steps):
        raise typer.BadParameter(f"epochs must be at least 1, got {text!r}")
    return steps


def require_data_root(data_root: Path | None) -> Path:
    if data_root is None:
        raise fail("no data root: pass --data-root or set REID_DATA_ROOT")
    return data_root


def resolve_init_weights(value: str | None, *, bundles: bool = False) -> str | None:
    """None, 'imagenet', or the absolute path of a state-dict file (or, with ``bundles``, a bundle)."""
    if value is None or value.lower() == "none":
        return None
    if value.lower() == "imagenet":
        return "imagenet"
    from training.warm_start import is_bundle_dir

    path = Path(value)
    if bundles and is_bundle_dir(path):
        return str(path.resolve())
    if not path.is_file():
        kinds = "a state-dict file, a re-ID bundle folder" if bundles else "a state-dict file"
        raise fail(f"--init-weights {value}: no such file (pass {kinds}, 'imagenet' or 'none')")
    return str(path.resolve())


def prepare_config(config_cls: type, options: dict[str, Any], run_dir: Path | None, resume: bool) -> Any:
    """A new config from the given options, or the saved one of ``run_dir`` with allowed overrides.

    ``options`` holds only what the user passed (None = not given). On ``--resume`` the run continues
    with its saved config; only the options that do not change what is trained may be given again.
    """
    from training.engine import CONFIG_FILE

    given = {k: v for k, v in options.items() if v is not None}
    if not resume:
        return config_cls(**given, run_dir=str(run_dir) if run_dir else "")
    if run_dir is None:
        raise fail("--resume needs --run-dir (the run to continue)")
    saved = config_cls.load(run_dir / CONFIG_FILE)
    changeable = {
        "epochs",
        "patience",
        "device",
        "workers",
        "threads",
        "data_root",
        "cache_dir",
        "progress",
        "amp",
    }
    refused = sorted(set(given) - changeable)
    if refused:
        raise fail(f"--resume continues the saved config; these options cannot change: {', '.join(refused)}")
    return saved.replace(run_dir=str(run_dir), **given)


@app.command("train-attributes")
def train_attributes(
    data_root: DataRoot = None,
    layout: Annotated[str | None, typer.Option(help="auto | course | original")] = None,
    backbone: Annotated[str | None, typer.Option(help="resnet50 | mobilenet_v2 | osnet_x0_25")] = None,
    init_weights: Annotated[
        str | None,
        typer.Option(
            help="State-dict file, 'imagenet' (torchvision download), 'none', or a re-ID bundle folder "
            "(its backbone: e.g. --backbone osnet_x0_25 --init-weights models_store/reid)."
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
            "(the report's, default), mean_accuracy or mA (maximised)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
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
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bars.")] = None,
) -> None:
    """Train the 12-head attribute classifier; writes the run directory (config, metrics, best.pt, plots)."""
    from app.schema import ATTRIBUTE_GROUPS  # noqa: F401  (fail early if app/ is missing)
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
        "workers": workers,
        "threads": threads,
        "split_file": str(split_file) if split_file else None,
        "seed": seed,
        "limit_ids": limit_ids,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "class_weights": class_weights,
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


@app.command("evaluate-attributes")
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


@app.command()
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


@app.command("data-stats")
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
    from app.schema import GROUPS_BY_NAME

    typer.echo(f"{data.layout} layout: {len(data.train)} images, {len(data.train_ids)} identities")
    for name, values in counts.items():
        classes = GROUPS_BY_NAME[name].classes
        typer.echo(f"{name:>14}: " + ", ".join(f"{c} {v}" for c, v in zip(classes, values, strict=True)))
    typer.echo(f"wrote {out / 'class_balance.png'} and {out / 'class_counts.json'}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished (or interrupted) run directory.")],
    store: Annotated[Path, typer.Option(help="Folder of bundles.")] = Path("models_store"),
    name: Annotated[
        str | None, typer.Option(help="Bundle name (default: the task, 'attributes' or 'reid').")
    ] = None,
    half: Annotated[bool, typer.Option("--half", help="Store the weights in float16.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    logit_adjust: Annotated[
        float,
        typer.Option(
            help="Attribute runs: logit adjustment tau, one of the run's report.md trade-off table "
            "(0 = most accurate, 1 = most balanced); folded into the heads' biases."
        ),
    ] = 0.0,
    metrics_from: Annotated[
        Path | None,
        typer.Option(
            help="Re-ID runs trained with --train-all: the bundle of the same recipe's split run, "
            "whose validation metrics and thresholds the manifest carries."
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


@app.command("add-onnx")
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


@app.command("predict-attributes")
def predict_attributes(
    bundle: Annotated[Path, typer.Option(help="Attribute bundle directory.")],
    images: Annotated[Path, typer.Option(help="Folder of images (jpg/png).")],
    out: Annotated[Path, typer.Option(help="CSV to write, in annotations_train.csv's format.")],
    batch_size: int = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 2,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: one per core).")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Predict the attributes of every image of a folder; one CSV row per image, id = file name."""
    from training.batch_inference import open_bundle
    from training.data.market import list_images

    try:
        manifest, model = open_bundle(bundle, "attributes", threads)
        paths = list_images(images)
        started = time.perf_counter()
        count = write_predictions(
            model, paths, out, manifest.input_size, batch_size, device, workers, progress
        )
    except user_errors() as exc:
        raise fail(str(exc)) from None
    seconds = time.perf_counter() - started
    typer.echo(f"{out}: {count} rows in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s)")


def write_predictions(
    model: Any,
    paths: list[Path],
    out: Path,
    size: tuple[int, int],
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 2,
    progress: bool = True,
) -> int:
    """Decode (threads, one batch ahead) and classify ``paths``; write the CSV; return the row count."""
    from app.schema import ATTRIBUTE_GROUPS, CSV_COLUMNS, row_from_labels
    from training.batch_inference import model_inputs

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        inputs = model_inputs(
            model, paths, size, batch_size=batch_size, device=device, workers=workers, progress=progress
        )
        for net, batch, x in inputs:
            logits = net(x)
            preds = {g.name: logits[g.name].argmax(1).tolist() for g in ATTRIBUTE_GROUPS}
            for i, path in enumerate(batch):
                writer.writerow(row_from_labels({name: p[i] for name, p in preds.items()}, path.name))
    return len(paths)


def main() -> None:
    app()


# -- Commands of other tasks ------------------------------------------------------------------------
# The re-ID task adds its commands here: training/reid_cli.py defines register(app), and this guarded
# import picks it up once that module exists (cli.py keeps working without it).
if __name__ == "__main__":
    # `python -m training.cli` runs this file as __main__: run the importable module instead, so every
    # command registers on one app.
    from training.cli import main as _main

    _main()
else:
    try:
        from training import reid_cli
    except ModuleNotFoundError as _exc:  # only the module's own absence is tolerated
        if _exc.name != "training.reid_cli":
            raise
    else:
        reid_cli.register(app)
