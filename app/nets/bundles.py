"""The torch side of model bundles: rebuild a manifest's network, save it, load it with its weights.

``app.bundle`` reads manifests and checks files without torch; this module is what training and the
service's torch runtime use on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as dump_safetensors
from torch import nn

from app.bundle import (
    BundleError,
    Manifest,
    Task,
    file_sha256,
    read_manifest,
    replace_file,
    verified_bytes,
    write_manifest,
)
from app.nets.attributes import AttributeNet, AttributeNetConfig
from app.nets.ensemble import ReIDEnsemble, is_ensemble
from app.nets.reid import ReIDNet, ReIDNetConfig


def build_network(task: Task, architecture: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained network of the manifest's architecture."""
    if task == "attributes":
        return AttributeNet(AttributeNetConfig.from_dict(architecture))
    if is_ensemble(architecture):
        return ReIDEnsemble.from_architecture(architecture)
    return ReIDNet(ReIDNetConfig.from_dict(architecture))


def save_bundle(
    directory: str | Path, model: nn.Module, manifest: Manifest, *, half: bool = False
) -> Manifest:
    """Write weights (optionally fp16) and the manifest with their checksum; return the manifest.

    The new weights invalidate any ONNX graph the manifest named; ``training.onnx_export`` adds one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    weights = directory / manifest.weights_file
    # not save_file: it writes mode 0600, which the service's user (in an image too) may not read
    replace_file(weights, dump_safetensors(state))
    manifest = manifest.model_copy(
        update={
            "weights_sha256": file_sha256(weights),
            "weights_dtype": "float16" if half else "float32",
            "onnx": None,
        }
    )
    write_manifest(directory, manifest)
    return manifest


def load_bundle(directory: str | Path, *, device: str = "cpu") -> tuple[Manifest, nn.Module]:
    """Validate manifest and checksum, rebuild the network, load weights; returns it in eval mode."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    data = verified_bytes(directory, manifest.weights_file, manifest.weights_sha256, "weights")
    weights = directory / Path(manifest.weights_file).name
    model = build_network(manifest.task, manifest.architecture)
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_safetensors(data).items()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise BundleError(f"{weights}: not a readable safetensors file: {exc}") from None
    misfit = _misfit(model.state_dict(), state)
    if misfit:
        raise BundleError(f"{weights}: weights do not fit the manifest's architecture: {misfit}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not fit the manifest's architecture: {exc}") from None
    return manifest, model.to(device).eval()


def _misfit(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """How ``given`` tensors differ from the network's, in one short line ('' when they fit); torch's
    own report lists every key on lines of its own."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            parts.append(f"tensors {what}: {len(keys)} (first {keys[0]})")
    return "; ".join(parts)
