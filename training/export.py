"""Run directory -> model bundle (``models_store/<name>/``: ``manifest.json``, ``weights.safetensors``,
``model.onnx``).

The bundle is built from the run's ``best.pt`` alone: the task name, the network's architecture, its
weights, the run config (with the data fingerprint) and the best epoch's metrics. The network is rebuilt
with ``app.bundle.build_network`` before saving, so a bundle that exports is one the service can load.

What differs between tasks is only the manifest's task-specific fields, looked up in
:data:`MANIFEST_FIELDS` by the checkpoint's task: ``attributes`` adds the attribute schema; ``reid``
calls ``training.tasks.reid_outputs.manifest_fields(checkpoint, run_dir)`` (the re-ID task's own code,
imported only when a re-ID run is exported), which returns the embedding spec, the match threshold and
its metrics. A fields function runs before the network is rebuilt and may edit
``checkpoint['architecture']`` and ``checkpoint['model']`` in place to drop training-only parts (the
re-ID identity classifiers).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.attribute_schema import schema_as_dict
from app.bundle import Manifest
from app.nets.bundles import build_network, load_bundle, save_bundle
from app.nets.ensemble import is_ensemble
from training.engine import BEST, COMMANDS_FILE, load_checkpoint
from training.onnx_export import add_onnx

DEFAULT_STORE = "models_store"


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


LogitAdjust = float | str  # one tau, or PER_GROUP: the per-group taus chosen on validation
PER_GROUP = "per-group"


def _attribute_fields(
    checkpoint: dict[str, Any],
    run_dir: Path,
    logit_adjust: LogitAdjust = 0.0,
    metrics_from: Path | None = None,
) -> dict[str, Any]:
    final = run_dir / "val_metrics.json"
    # val_metrics.json: the best epoch re-evaluated after training, with the majority baseline
    saved = json.loads(final.read_text()) if final.is_file() else {}
    if metrics_from is not None:
        from app.bundle import read_manifest

        source = read_manifest(metrics_from)
        return {
            "attribute_schema": schema_as_dict(),
            "metrics": _split_run_rule(checkpoint, saved, source, metrics_from),
            # the neighbour rule validated on the split run (evaluate-neighbours) goes with its taus
            "neighbour_smoothing": source.neighbour_smoothing,
        }
    if checkpoint.get("config", {}).get("train_all"):
        raise ExportError(
            f"{run_dir} was trained on every identity, so its validation identities were seen: export it "
            "with --metrics-from the bundle of the same recipe's split run"
        )
    metrics = _scalars(saved.get("validation") or checkpoint["metrics"])
    if logit_adjust:
        row, taus = _measured_rule(saved, logit_adjust)
        _fold_taus(checkpoint, saved, taus)
        metrics = {**_scalars(row), "logit_adjust": taus if logit_adjust == PER_GROUP else logit_adjust}
    if saved:
        metrics["majority_baseline"] = _scalars(saved["majority_baseline"])
    metrics["best_epoch"] = checkpoint["epoch"]
    return {"attribute_schema": schema_as_dict(), "metrics": metrics}


def _measured_rule(
    saved: dict[str, Any], logit_adjust: LogitAdjust
) -> tuple[dict[str, Any], dict[str, float]]:
    """The validation metrics of a decision rule the run measured, and its tau per group."""
    adjustment = saved.get("logit_adjustment", {})
    rows = adjustment.get("tradeoff", [])
    if logit_adjust == PER_GROUP:
        if "per_group" not in adjustment:
            raise ExportError(
                "--logit-adjust per-group: this run's val_metrics.json has no per-group taus "
                "(re-evaluate it with reid-train evaluate-attributes)"
            )
        row = dict(adjustment["per_group"])
        return row, row.pop("taus")
    tau = float(logit_adjust)
    row = next((r for r in rows if abs(r["tau"] - tau) < 1e-9), None)
    if row is None:
        measured = ", ".join(f"{r['tau']:g}" for r in rows) or "none (no val_metrics.json from this code)"
        raise ExportError(f"--logit-adjust {tau:g} was not evaluated for this run; evaluated: {measured}")
    return {k: v for k, v in row.items() if k != "tau"}, dict.fromkeys(adjustment["log_priors"], tau)


def _fold_taus(checkpoint: dict[str, Any], saved: dict[str, Any], taus: dict[str, float]) -> None:
    """Fold ``-tau * log prior`` (this run's training priors) into each head's bias."""
    model = checkpoint["model"]
    for name, log_prior in saved["logit_adjustment"]["log_priors"].items():
        key = f"heads.{name}.1.bias"  # Sequential(Dropout, Linear)
        model[key] = model[key] - taus[name] * torch.tensor(log_prior, dtype=model[key].dtype)


def _split_run_rule(
    checkpoint: dict[str, Any], saved: dict[str, Any], source: Any, metrics_from: Path
) -> dict[str, Any]:
    """A run on every identity takes the decision rule and validation metrics of the same recipe's split
    run (its bundle, ``source`` the manifest read from ``metrics_from``): the taus are applied with this
    run's own class priors."""
    if source.task != "attributes":
        raise ExportError(f"--metrics-from {metrics_from} is a {source.task} bundle, not an attribute bundle")
    if not checkpoint.get("config", {}).get("train_all"):
        raise ExportError(
            "--metrics-from is for runs trained with --train-all; this run has its own validation"
        )
    if not saved:
        raise ExportError(f"{metrics_from}: the run has no val_metrics.json (its class priors)")
    rule = source.metrics.get("logit_adjust", 0.0)
    priors = saved["logit_adjustment"]["log_priors"]
    _fold_taus(checkpoint, saved, rule if isinstance(rule, dict) else dict.fromkeys(priors, float(rule)))
    return {
        **source.metrics,
        "metrics_from": f"{source.name} {source.version} (the same recipe on the split)",
        "best_epoch": checkpoint["epoch"],
    }


def _reid_fields(
    checkpoint: dict[str, Any], run_dir: Path, metrics_from: Path | None = None
) -> dict[str, Any]:
    from app.bundle import read_manifest
    from training.tasks.reid_outputs import manifest_fields  # the re-ID task's own code

    source = read_manifest(metrics_from) if metrics_from is not None else None
    if source is not None and source.task != "reid":
        raise ExportError(f"--metrics-from {metrics_from} is a {source.task} bundle, not a re-ID bundle")
    try:
        return manifest_fields(checkpoint, run_dir, source)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


MANIFEST_FIELDS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "attributes": _attribute_fields,
    "reid": _reid_fields,
}


def _training_commands(run_dir: Path) -> list[str]:
    path = run_dir / COMMANDS_FILE
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class ExportError(RuntimeError):
    """A run that cannot be exported; the message says why."""


def export_run(
    run_dir: str | Path,
    *,
    store: str | Path = DEFAULT_STORE,
    name: str | None = None,
    half: bool = False,
    force: bool = False,
    command: str | None = None,
    logit_adjust: LogitAdjust = 0.0,
    metrics_from: str | Path | None = None,
) -> Path:
    """Write ``<store>/<name>/`` (name defaults to the task: ``attributes`` or ``reid``); returns it.

    ``logit_adjust`` (attribute runs): fold the decision rule at that tau (or ``per-group``: each group's
    tau chosen on validation) into the heads' biases, and record the validation metrics measured with it
    (``val_metrics.json``). ``metrics_from`` (runs trained with ``--train-all``): the bundle of the same
    recipe's split run, whose validation (and, for attributes, decision rule) stands in for the one this
    run cannot have.
    """
    run_dir = Path(run_dir)
    if logit_adjust != PER_GROUP:
        try:
            logit_adjust = float(logit_adjust)
        except ValueError:
            raise ExportError(f"--logit-adjust takes a tau or {PER_GROUP!r}, got {logit_adjust!r}") from None
    checkpoint = load_checkpoint(run_dir / BEST)
    task = checkpoint.get("task")
    if task not in MANIFEST_FIELDS:
        raise ExportError(f"{run_dir / BEST}: unknown task {task!r}; known: {', '.join(MANIFEST_FIELDS)}")
    if not checkpoint.get("architecture"):
        raise ExportError(f"{run_dir / BEST}: no architecture recorded (the model has no config)")
    directory = Path(store) / (name or task)
    if (directory / "manifest.json").exists() and not force:
        raise ExportError(f"{directory} already holds a bundle; pass --force to replace it")
    config = checkpoint.get("config", {})
    if logit_adjust and task != "attributes":
        raise ExportError(f"--logit-adjust applies to attribute runs; {run_dir} is a {task!r} run")
    if metrics_from is not None and logit_adjust:
        raise ExportError(
            "--metrics-from brings the split run's decision rule; --logit-adjust cannot be given too"
        )
    source = Path(metrics_from) if metrics_from else None
    if task == "attributes":
        fields = _attribute_fields(checkpoint, run_dir, logit_adjust, source)
    else:  # may drop training-only parts (the identity classifiers) first
        fields = _reid_fields(checkpoint, run_dir, source)
    architecture = checkpoint["architecture"]
    model = build_network(task, architecture)
    model.load_state_dict(checkpoint["model"], strict=True)
    model.eval()
    manifest = Manifest(
        name=directory.name,
        task=task,
        architecture=architecture,
        backbone=architecture["backbone"],
        input_size=tuple(architecture["input_size"]),
        mean=tuple(architecture["mean"]),
        std=tuple(architecture["std"]),
        data_fingerprint=config.get("data_fingerprint", ""),
        training_config=config,
        command=command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        training_commands=_training_commands(run_dir),
        **fields,
    )
    save_bundle(directory, model, manifest, half=half)
    _, loaded = load_bundle(directory)  # what the torch runtime will do: manifest, checksum, weights
    add_onnx(directory, net=loaded)  # what ONNX Runtime will run, checked against the weights just saved
    return directory


def flip_bundle(
    source: str | Path,
    *,
    store: str | Path = DEFAULT_STORE,
    name: str,
    force: bool = False,
    command: str | None = None,
    metrics_from: str | Path | None = None,
) -> Path:
    """``<store>/<name>/``: the re-ID bundle ``source`` with test-time flip on (``flip_average``: its
    ONNX graph embeds each crop and its mirror image); returns it.

    The same weights give other embeddings, so the bundle has a version of its own and none of the
    source's validation: evaluate it (``evaluate-reid --record``), or, for a bundle trained on every
    identity, carry that of the flipped split bundle (``metrics_from``), as export does.
    """
    import shutil

    from app.bundle import read_manifest, write_manifest

    source = Path(source)
    manifest = read_manifest(source)
    if manifest.task != "reid":
        raise ExportError(f"{source} is a {manifest.task} bundle; test-time flip is for re-ID bundles")
    if manifest.architecture.get("flip_average"):
        raise ExportError(f"{source} already embeds with test-time flip")
    if is_ensemble(manifest.architecture):
        raise ExportError(f"{source} is an ensemble: flip its members before building it")
    split = split_manifest(
        metrics_from,
        bool(manifest.training_config.get("train_all")),
        source,
        "the flipped bundle of the same recipe's split run",
    )
    if split is not None and not split.architecture.get("flip_average"):
        raise ExportError(f"--metrics-from {metrics_from} does not embed with test-time flip")
    directory = new_bundle_directory(store, name, force, [source], "flip-bundle")
    shutil.copyfile(source / manifest.weights_file, directory / manifest.weights_file)
    flipped = manifest.model_copy(
        update={
            "name": directory.name,
            "architecture": {**manifest.architecture, "flip_average": True},
            "command": command_line(command),
            "onnx": None,
            **borrowed_validation(manifest.metrics, split),
        }
    )
    write_manifest(directory, flipped)
    add_onnx(directory)  # from the bundle as the runtimes will load it: flip included
    return directory


def command_line(command: str | None) -> str:
    """The command that made a bundle: ``command`` if given, else this process's own."""
    return command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def split_manifest(metrics_from: str | Path | None, trained_all: bool, source: Path, wanted: str) -> Any:
    """The manifest a derived bundle borrows its validation from (None: it is measured anew); a bundle
    built from networks trained on every identity must name one (``wanted`` says which)."""
    from app.bundle import read_manifest

    if metrics_from is None:
        if trained_all:
            raise ExportError(
                f"{source} was trained on every identity: pass --metrics-from {wanted}, whose validation "
                "it carries"
            )
        return None
    return read_manifest(Path(metrics_from))


def new_bundle_directory(store: str | Path, name: str, force: bool, sources: list[Path], verb: str) -> Path:
    """``<store>/<name>``, created; refuses to replace a bundle without ``force`` or any source."""
    from app.bundle import MANIFEST

    directory = Path(store) / name
    if (directory / MANIFEST).exists() and not force:
        raise ExportError(f"{directory} already holds a bundle; pass --force to replace it")
    if any(directory.resolve() == s.resolve() for s in sources):
        raise ExportError(f"{verb} writes a new bundle; choose another --name or --store")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def borrowed_validation(own: dict[str, Any], split: Any) -> dict[str, Any]:
    """Manifest fields of a derived re-ID bundle: the ``split`` bundle's validation, thresholds and
    query path (with ``own`` metrics' record of what it was trained on), or none to measure anew."""
    if split is None:
        return {"metrics": {}, "match_threshold": None, "query_expansion": None}
    return {
        "metrics": {
            **split.metrics,
            **{k: own[k] for k in ("trained_on", "identities") if k in own},
            "metrics_from": f"{split.name} {split.version}",
        },
        "match_threshold": split.match_threshold,
        "query_expansion": split.query_expansion,
    }
