"""Run directory -> model bundle (``models_store/<name>/manifest.json`` + ``weights.safetensors``).

The bundle is built from the run's ``best.pt`` alone: the task name, the network's architecture, its
weights, the run config (with the data fingerprint) and the best epoch's metrics. The network is rebuilt
with ``app.bundle.build_network`` before saving, so a bundle that exports is one the service can load.

What differs between tasks is only the manifest's task-specific fields, looked up in
:data:`MANIFEST_FIELDS` by the checkpoint's task: ``attributes`` adds the attribute schema; ``reid``
calls ``training.tasks.reid.manifest_fields(checkpoint, run_dir)`` (the re-ID task's own code, imported
only when a re-ID run is exported), which returns the embedding spec, the match threshold and its metrics.
A fields function runs before the network is rebuilt and may edit ``checkpoint['architecture']`` and
``checkpoint['model']`` in place to drop training-only parts (the re-ID identity classifiers).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.bundle import Manifest, build_network, load_bundle, save_bundle
from app.schema import schema_as_dict
from training.engine import BEST, load_checkpoint

DEFAULT_STORE = "models_store"


def _attribute_fields(checkpoint: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    metrics = {k: v for k, v in checkpoint["metrics"].items() if isinstance(v, int | float)}
    final = run_dir / "val_metrics.json"
    if final.is_file():  # the best epoch re-evaluated after training, with the majority baseline
        saved = json.loads(final.read_text())
        metrics = {k: v for k, v in saved["validation"].items() if isinstance(v, int | float)}
        metrics["majority_baseline"] = {
            k: v for k, v in saved["majority_baseline"].items() if isinstance(v, int | float)
        }
    metrics["best_epoch"] = checkpoint["epoch"]
    return {"attribute_schema": schema_as_dict(), "metrics": metrics}


def _reid_fields(checkpoint: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from training.tasks.reid import manifest_fields  # the re-ID task's own code

    return manifest_fields(checkpoint, run_dir)


MANIFEST_FIELDS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "attributes": _attribute_fields,
    "reid": _reid_fields,
}


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
) -> Path:
    """Write ``<store>/<name>/`` (name defaults to the task: ``attributes`` or ``reid``); returns it."""
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
        **fields,
    )
    save_bundle(directory, model, manifest, half=half)
    load_bundle(directory)  # what the service will do: validate the manifest, checksum and weights
    return directory
