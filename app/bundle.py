"""Model bundles: a directory with ``manifest.json`` and ``weights.safetensors``.

Training writes them (``training/export.py``); the service loads them. The manifest alone is enough to
rebuild the network (nanoGPT's 'model_args' next to the weights), and the weights' sha256 is checked
before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from app.nets.attributes import AttributeNet, AttributeNetConfig
from app.nets.reid import ReIDNet, ReIDNetConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"

Task = Literal["attributes", "reid"]


class BundleError(ValueError):
    """A bundle directory that cannot be loaded; the message says why."""


class EmbeddingSpec(BaseModel):
    """How a re-ID bundle's embeddings are compared."""

    dim: int
    normalized: bool = True
    distance: Literal["cosine"] = "cosine"


class Manifest(BaseModel):
    """Everything the service needs to know about a bundle, and how it was made."""

    format_version: int = FORMAT_VERSION
    name: str
    task: Task
    architecture: dict[str, Any]
    backbone: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    attribute_schema: list[dict[str, Any]] | None = None
    embedding: EmbeddingSpec | None = None
    match_threshold: float | None = Field(
        default=None, description="cosine similarity at 1% validation false-match rate"
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_fingerprint: str = ""
    training_config: dict[str, Any] = Field(default_factory=dict)
    command: str = ""  # the export command
    training_commands: list[str] = Field(
        default_factory=list, description="command lines that trained the run: its start, then any resumes"
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    weights_file: str = WEIGHTS
    weights_dtype: Literal["float32", "float16"] = "float32"
    weights_sha256: str = ""

    @property
    def version(self) -> str:
        """A short, stable identifier of these exact weights."""
        return self.weights_sha256[:12]


def build_network(task: Task, architecture: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained network of the manifest's architecture."""
    if task == "attributes":
        return AttributeNet(AttributeNetConfig.from_dict(architecture))
    return ReIDNet(ReIDNetConfig.from_dict(architecture))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(
    directory: str | Path, model: nn.Module, manifest: Manifest, *, half: bool = False
) -> Manifest:
    """Write weights (optionally fp16) and the manifest with their checksum; return the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    weights = directory / manifest.weights_file
    save_file(state, str(weights))
    manifest = manifest.model_copy(
        update={
            "weights_sha256": _sha256(weights),
            "weights_dtype": "float16" if half else "float32",
        }
    )
    (directory / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and validate a bundle's manifest without loading its weights."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no manifest (is this a bundle directory?)")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format version {manifest.format_version}, this build reads {FORMAT_VERSION}"
        )
    return manifest


def load_bundle(directory: str | Path, *, device: str = "cpu") -> tuple[Manifest, nn.Module]:
    """Validate manifest and checksum, rebuild the network, load weights; returns it in eval mode."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / Path(manifest.weights_file).name  # never a path outside the bundle
    if not weights.is_file():
        raise BundleError(f"{weights}: weights file missing")
    if _sha256(weights) != manifest.weights_sha256:
        raise BundleError(f"{weights}: sha256 does not match the manifest (corrupt or replaced)")
    model = build_network(manifest.task, manifest.architecture)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not fit the manifest's architecture: {exc}") from None
    return manifest, model.to(device).eval()
