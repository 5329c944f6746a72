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
from training.engine import BEST, COMMANDS_FILE, load_checkpoint
from training.onnx_export import add_onnx

DEFAULT_STORE = "models_store"


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _attribute_fields(checkpoint: dict[str, Any], run_dir: Path, logit_adjust: float = 0.0) -> dict[str, Any]:
    final = run_dir / "val_metrics.json"
    # val_metrics.json: the best epoch re-evaluated after training, with the majority baseline
    saved = json.loads(final.read_text()) if final.is_file() else {}
    metrics = _scalars(saved.get("validation") or checkpoint["metrics"])
    if logit_adjust:
        metrics = {**_scalars(_adjust_heads(checkpoint, saved, logit_adjust)), "logit_adjust": logit_adjust}
    if saved:
        metrics["majority_baseline"] = _scalars(saved["majority_baseline"])
    metrics["best_epoch"] = checkpoint["epoch"]
    return {"attribute_schema": schema_as_dict(), "metrics": metrics}


def _adjust_heads(checkpoint: dict[str, Any], saved: dict[str, Any], tau: float) -> dict[str, Any]:
    """Fold ``-tau * log prior`` into each head's bias; return the validation metrics at that tau."""
    rows = saved.get("logit_adjustment", {}).get("tradeoff", [])
    row = next((r for r in rows if abs(r["tau"] - tau) < 1e-9), None)
    if row is None:
        measured = ", ".join(f"{r['tau']:g}" for r in rows) or "none (no val_metrics.json from this code)"
        raise ExportError(f"--logit-adjust {tau:g} was not evaluated for this run; evaluated: {measured}")
    model = checkpoint["model"]
    for name, log_prior in saved["logit_adjustment"]["log_priors"].items():
        key = f"heads.{name}.1.bias"  # Sequential(Dropout, Linear)
        model[key] = model[key] - tau * torch.tensor(log_prior, dtype=model[key].dtype)
    return {k: v for k, v in row.items() if k != "tau"}


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
    logit_adjust: float = 0.0,
    metrics_from: str | Path | None = None,
) -> Path:
    """Write ``<store>/<name>/`` (name defaults to the task: ``attributes`` or ``reid``); returns it.

    ``logit_adjust`` (attribute runs): fold the decision rule at that tau into the heads' biases, and
    record the validation metrics measured at that tau (``val_metrics.json``'s trade-off table).
    ``metrics_from`` (re-ID runs trained with ``--train-all``): the bundle of the same recipe's split
    run, whose validation stands in for the one this run cannot have.
    """
    run_dir = Path(run_dir)
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
    if metrics_from is not None and task != "reid":
        raise ExportError(f"--metrics-from applies to re-ID runs; {run_dir} is a {task!r} run")
    if logit_adjust:
        fields = _attribute_fields(checkpoint, run_dir, logit_adjust)
    elif task == "reid":
        fields = _reid_fields(checkpoint, run_dir, Path(metrics_from) if metrics_from else None)
    else:
        fields = MANIFEST_FIELDS[task](checkpoint, run_dir)  # may drop training-only parts first
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
