"""Re-ID bundles -> one ensemble bundle (``reid-train ensemble-bundle``; ``app.nets.ensemble``).

The members' weights are copied as they are: no training. The new bundle's input size, preprocessing
and training config are the first member's (its ``train_all`` set when any member's is), its training
commands every member's, and its validation is measured anew (``evaluate-reid --record``) or, when a
member was trained on every identity, borrowed from the ensemble of the split-trained members
(``metrics_from``), as ``export --metrics-from`` does for one network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from app.bundle import EmbeddingSpec, Manifest, read_manifest
from app.nets.bundles import load_bundle, save_bundle
from app.nets.ensemble import ENSEMBLE, ReIDEnsemble, is_ensemble
from training.export import (
    DEFAULT_STORE,
    ExportError,
    borrowed_validation,
    command_line,
    new_bundle_directory,
    split_manifest,
)
from training.onnx_export import add_onnx


def ensemble_bundle(
    members: Sequence[str | Path],
    weights: Sequence[float],
    *,
    store: str | Path = DEFAULT_STORE,
    name: str,
    force: bool = False,
    command: str | None = None,
    metrics_from: str | Path | None = None,
) -> Path:
    """``<store>/<name>/``: the re-ID bundles ``members`` as one, their embeddings weighted by
    ``weights`` (normalised to sum 1); returns it."""
    sources = [Path(m) for m in members]
    if len(sources) < 2 or len(weights) != len(sources):
        raise ExportError(f"an ensemble needs two or more bundles and one weight each; got {len(sources)} "
                          f"bundles and {len(weights)} weights")  # fmt: skip
    manifests = [read_manifest(s) for s in sources]
    for source, manifest in zip(sources, manifests, strict=True):
        if manifest.task != "reid":
            raise ExportError(f"{source} is a {manifest.task} bundle; ensembles are of re-ID bundles")
        if is_ensemble(manifest.architecture):
            raise ExportError(f"{source} is an ensemble already; name its members instead")
    first = manifests[0]
    trained_all = any(m.training_config.get("train_all") for m in manifests)
    split = split_manifest(metrics_from, trained_all, sources[0], "the ensemble of the split-trained members")
    if split is not None and len(split.architecture.get(ENSEMBLE, [])) != len(sources):
        raise ExportError(f"--metrics-from {metrics_from} is not an ensemble of {len(sources)} bundles")
    try:
        model = ReIDEnsemble([load_bundle(s)[1] for s in sources], list(weights))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    directory = new_bundle_directory(store, name, force, sources, "ensemble-bundle")
    total = sum(weights)
    architecture = {
        ENSEMBLE: [
            {"architecture": m.architecture, "weight": w / total, "bundle": f"{m.name} {m.version}"}
            for m, w in zip(manifests, weights, strict=True)
        ],
        "dim": model.embedding_dim,  # the projection's width (app.nets.ensemble)
        "backbone": "+".join(m.backbone for m in manifests),
        "input_size": list(first.input_size),
        "mean": list(first.mean),
        "std": list(first.std),
    }
    manifest = Manifest(
        name=directory.name,
        task="reid",
        architecture=architecture,
        backbone=architecture["backbone"],
        input_size=first.input_size,
        mean=first.mean,
        std=first.std,
        embedding=EmbeddingSpec(dim=model.embedding_dim),
        data_fingerprint=first.data_fingerprint,
        training_config={**first.training_config, "train_all": trained_all},
        command=command_line(command),
        training_commands=[c for m in manifests for c in m.training_commands],
        **borrowed_validation(first.metrics, split),
    )
    save_bundle(directory, model, manifest)
    add_onnx(directory)  # from the bundle as the runtimes will load it
    return directory
