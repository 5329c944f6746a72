"""Model bundles: a directory with ``manifest.json``, ``weights.safetensors`` and ``model.onnx``.

Training writes them (``training/export.py``); the service loads them. The manifest alone is enough to
rebuild the network (nanoGPT's 'model_args' next to the weights), and every file's sha256 is checked
before it is used. This module reads manifests and checks files without torch, so the service can run
a bundle's ONNX graph on a machine that has no torch; ``app.nets.bundles`` is the torch side.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ONNX_GRAPH = "model.onnx"
ONNX_INPUT = "images"  # uint8 (batch, 3, height, width), RGB; the graph normalises inside

Task = Literal["attributes", "reid"]


class BundleError(ValueError):
    """A bundle directory that cannot be loaded; the message says why."""


class EmbeddingSpec(BaseModel):
    """How a re-ID bundle's embeddings are compared."""

    dim: int
    normalized: bool = True
    distance: Literal["cosine"] = "cosine"


class GallerySideSpec(BaseModel):
    """Gallery-side augmentation of the query's pool (``app.retrieval``) as validated for this bundle,
    with the threshold of the scores it gives."""

    # Absent from manifests recorded before 2026-12-02, which were validated expanding the query first.
    order: Literal["augment_first", "expand_first"] = Field(
        default="expand_first",
        description="augment_first: the pool's entries are augmented, then the query is expanded with "
        "them; expand_first: the query is expanded with raw entries, then its shortlist rescored",
    )
    neighbours: int = Field(gt=0, description="other entries averaged into each candidate")
    alpha: float = Field(ge=0, description="their weights are similarity**alpha")
    weight: float = Field(ge=0, le=1, description="share of the neighbourhood in a candidate's score")
    shortlist: int = Field(gt=0, description="candidates rescored per query (at least top_k)")
    pool: int = Field(default=500, gt=0, description="best entries per query the neighbours come from")
    match_threshold: float = Field(description="rescored similarity at 1% false matches")


class QueryExpansionSpec(BaseModel):
    """alpha-weighted query expansion (``app.retrieval``) as validated for this bundle: its own match
    threshold, because expanded queries score higher than plain ones."""

    neighbours: int = Field(gt=0)
    # Absent from manifests recorded before 2026-12-01, which were validated with weights sim^3.
    alpha: float = Field(default=3.0, ge=0, description="neighbour weights are similarity**alpha")
    match_threshold: float = Field(description="similarity of expanded queries at 1% false matches")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="validation metrics with and without it, per protocol"
    )
    gallery_side: GallerySideSpec | None = None


class NeighbourSmoothingSpec(BaseModel):
    """Attributes averaged over each crop's re-ID neighbours (``training.attribute_neighbours``), as
    validated for this attribute bundle: offline prediction over a set of crops, not the service."""

    neighbours: int = Field(gt=0, description="nearest other crops averaged into each crop")
    alpha: float = Field(ge=0, description="their weights are similarity**alpha")
    min_similarity: float = Field(
        default=0.0, description="neighbours less similar weigh 0 (0.01% of different-person pairs pass)"
    )
    reid_bundle: str = Field(description="name and version of the re-ID bundle it was validated with")
    taus: dict[str, float] = Field(
        default_factory=dict, description="per group, logit adjustment of the averaged probabilities"
    )
    log_priors: dict[str, list[float]] = Field(
        default_factory=dict, description="per group, log class shares of the training images"
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="distractor-validation metrics without and with it"
    )


class OnnxGraph(BaseModel):
    """The network as an ONNX graph: dynamic batch, uint8 input, checked against torch at export."""

    file: str = ONNX_GRAPH
    sha256: str
    opset: int
    input: str = ONNX_INPUT
    outputs: list[str] = Field(
        description="in order: the attribute groups' logits, or the re-ID bundle's one 'embedding'"
    )
    max_abs_diff: float = Field(description="largest |onnx - torch| over the outputs on the check batch")
    check_batch: int = Field(description="crops in the fixed batch the check ran on")
    exporter: str = ""


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
    onnx: OnnxGraph | None = None
    query_expansion: QueryExpansionSpec | None = None
    neighbour_smoothing: NeighbourSmoothingSpec | None = None

    @property
    def version(self) -> str:
        """A short, stable identifier of these exact weights (and of a test-time flip or an ensemble's
        member weights, which change every embedding they give)."""
        if self.architecture.get("flip_average"):
            return hashlib.sha256(f"{self.weights_sha256}+flip".encode()).hexdigest()[:12]
        if self.architecture.get("ensemble"):
            weights = ",".join(f"{float(m['weight']):g}" for m in self.architecture["ensemble"])
            return hashlib.sha256(f"{self.weights_sha256}+ensemble:{weights}".encode()).hexdigest()[:12]
        return self.weights_sha256[:12]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def replace_file(path: Path, data: bytes) -> None:
    """Write a bundle file atomically (a crash leaves the old one or the new one).

    A fresh file each time: it gets the umask's mode, not an old file's (or a library's 0600).
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically."""
    replace_file(Path(directory) / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


def verified_bytes(directory: str | Path, file: str, sha256: str, what: str) -> bytes:
    """A bundle file's bytes after checking them against the manifest's sha256 (read once, so the
    bytes checked are the bytes used)."""
    path = Path(directory) / Path(file).name  # never a path outside the bundle
    if not path.is_file():
        raise BundleError(f"{path}: {what} file missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(f"{path}: sha256 does not match the manifest (corrupt or replaced)")
    return data
