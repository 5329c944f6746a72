"""Decoded crops -> attribute predictions / re-ID embeddings, in batches.

Everything here is synchronous and CPU-bound; the API calls it from worker threads, never on the event
loop. A request's crops go through the network in batches of ``batch_size``, on the runtime that
``app.runtimes`` chose for the bundle (ONNX Runtime, or torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from app.attribute_schema import schema_as_dict
from app.bundle import BundleError, Manifest, read_manifest
from app.preprocess import images_to_batch
from app.runtimes import Runtime, RuntimeName, open_runtime

# (task, seconds, crops) after each forward pass; the app points this at its Prometheus metrics.
InferenceObserver = Callable[[str, float, int], None]


class MissingBundleError(BundleError):
    """A configured bundle directory does not exist."""


@dataclass(frozen=True)
class AttributeValue:
    """The predicted class of one attribute group and its softmax probability."""

    value: str
    score: float


Attributes = dict[str, AttributeValue]


def _batches(images: Sequence[Image.Image], size: tuple[int, int], batch: int):
    for start in range(0, len(images), batch):
        yield images_to_batch(list(images[start : start + batch]), size)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class _Model:
    task: str

    def __init__(
        self,
        manifest: Manifest,
        runtime: Runtime,
        *,
        batch_size: int = 8,
        observer: InferenceObserver | None = None,
    ) -> None:
        self.manifest = manifest
        self.runtime = runtime
        self.batch_size = batch_size
        self.observer = observer
        self._check_outputs(self._forward(np.zeros((1, 3, *self.input_size), np.uint8), observe=False))

    def _check_outputs(self, outputs: list[np.ndarray]) -> None:
        """Refuse a network whose outputs do not fit the manifest (runs once, at load; warms it up)."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.manifest.input_size)  # type: ignore[return-value]

    def _forward(self, batch: np.ndarray, *, observe: bool = True) -> list[np.ndarray]:
        start = time.perf_counter()
        out = self.runtime.run(batch)
        if observe and self.observer is not None:
            self.observer(self.task, time.perf_counter() - start, batch.shape[0])
        return out

    def describe(self) -> dict[str, object]:
        m = self.manifest
        return {
            "task": m.task,
            "name": m.name,
            "version": m.version,
            "backbone": m.backbone,
            "input_size": list(m.input_size),
            "created_at": m.created_at,
            "weights_sha256": m.weights_sha256,
            "runtime": self.runtime.name,
            "onnx_sha256": m.onnx.sha256 if m.onnx else None,
            "metrics": m.metrics,
        }


M = TypeVar("M", bound=_Model)


class AttributeModel(_Model):
    """The attribute bundle: per crop, each group's most probable class and its probability."""

    task = "attributes"

    def __init__(self, manifest: Manifest, runtime: Runtime, **kwargs) -> None:
        schema = manifest.attribute_schema or schema_as_dict()
        self.groups: dict[str, tuple[str, ...]] = {g["name"]: tuple(g["classes"]) for g in schema}
        super().__init__(manifest, runtime, **kwargs)

    def _check_outputs(self, outputs: list[np.ndarray]) -> None:
        heads = [o.shape[-1] for o in outputs]
        expected = [len(classes) for classes in self.groups.values()]
        if heads != expected:
            raise BundleError(
                f"attribute schema ({len(expected)} groups, class counts {expected}) does not match the "
                f"network's heads (class counts {heads})"
            )

    def describe(self) -> dict[str, object]:
        # The groups and their classes: what a client may filter on (the console builds its filters).
        return {**super().describe(), "groups": {name: list(c) for name, c in self.groups.items()}}

    def probabilities(
        self, images: Sequence[Image.Image], *, batch_size: int | None = None
    ) -> list[np.ndarray]:
        """Per group (schema order), the crops' (N, classes) softmax probabilities."""
        parts = [
            [_softmax(logits.astype(np.float32, copy=False)) for logits in self._forward(batch)]
            for batch in _batches(images, self.input_size, batch_size or self.batch_size)
        ]
        return [np.concatenate(group) for group in zip(*parts, strict=True)]

    def predict(self, images: Sequence[Image.Image], *, batch_size: int | None = None) -> list[Attributes]:
        """Each crop's attributes; ``batch_size`` crops per forward pass (default: the model's)."""
        return self.answers(self.probabilities(images, batch_size=batch_size))

    def answers(self, probabilities: Sequence[np.ndarray]) -> list[Attributes]:
        """Each crop's attributes from :meth:`probabilities`."""
        return [self._best([p[i] for p in probabilities]) for i in range(len(probabilities[0]))]

    def track_answer(self, probabilities: Sequence[np.ndarray]) -> Attributes:
        """One answer for crops of one person (a track): their class probabilities averaged, so a view
        that shows an attribute outvotes those that hide it (docs/models.md, *Attributes from several
        crops*)."""
        return self._best([p.mean(axis=0) for p in probabilities])

    def _best(self, probs: Sequence[np.ndarray]) -> Attributes:
        """Each group's most probable class and its probability, from one crop's (classes,) vectors."""
        best = {}
        for (name, classes), p in zip(self.groups.items(), probs, strict=True):
            k = int(p.argmax())
            best[name] = AttributeValue(classes[k], round(float(p[k]), 6))
        return best


class ReIDModel(_Model):
    """The re-ID bundle: L2-normalised float32 embeddings, compared by inner product (cosine)."""

    task = "reid"

    @property
    def dim(self) -> int:
        assert self.manifest.embedding is not None
        return self.manifest.embedding.dim

    @property
    def match_threshold(self) -> float | None:
        return self.manifest.match_threshold

    def _check_outputs(self, outputs: list[np.ndarray]) -> None:
        if len(outputs) != 1 or outputs[0].shape[-1] != self.dim:
            shapes = [o.shape[1:] for o in outputs]
            raise BundleError(f"the manifest's embedding.dim is {self.dim}; the network outputs {shapes}")

    def embed(self, images: Sequence[Image.Image], *, batch_size: int | None = None) -> np.ndarray:
        """(N, dim) embeddings; ``batch_size`` crops per forward pass (default: the model's)."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        row = 0
        for batch in _batches(images, self.input_size, batch_size or self.batch_size):
            (emb,) = self._forward(batch)
            out[row : row + emb.shape[0]] = emb
            row += emb.shape[0]
        return out

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "embedding_dim": self.dim, "match_threshold": self.match_threshold}


@dataclass
class Models:
    """The two loaded bundles."""

    attributes: AttributeModel
    reid: ReIDModel

    @classmethod
    def load(
        cls,
        attribute_dir: str | Path,
        reid_dir: str | Path,
        *,
        batch_size: int = 8,
        device: str = "cpu",
        runtime: RuntimeName | None = None,
        threads: int = 1,
        observer: InferenceObserver | None = None,
    ) -> Models:
        """Load both bundles; ``runtime`` None picks per bundle (see ``app.runtimes``)."""
        load = {"requested": runtime, "device": device, "threads": threads}
        options = {"batch_size": batch_size, "observer": observer}
        attributes = _open(AttributeModel, Path(attribute_dir), load, options)
        reid = _open(ReIDModel, Path(reid_dir), load, options)
        return cls(attributes, reid)

    @property
    def runtimes(self) -> set[str]:
        return {self.attributes.runtime.name, self.reid.runtime.name}

    def observe(self, observer: InferenceObserver | None) -> None:
        """Report every forward pass of both models to ``observer`` from now on."""
        self.attributes.observer = observer
        self.reid.observer = observer


def check_bundle(directory: str | Path, task: str) -> Manifest:
    """Cheap start-up check (directory, manifest, task) without loading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingBundleError(f"{task} bundle not found at {directory}")
    manifest = read_manifest(directory)
    if manifest.task != task:
        raise BundleError(f"{directory}: a {manifest.task!r} bundle where a {task!r} bundle was expected")
    if task == "reid" and manifest.embedding is None:
        raise BundleError(f"{directory}: re-ID manifest has no 'embedding' section")
    return manifest


def _open(model: type[M], directory: Path, load: dict[str, Any], options: dict[str, Any]) -> M:
    """``model`` on the bundle in ``directory``; an error names the directory (the model's own checks
    know only the manifest)."""
    manifest = check_bundle(directory, model.task)
    runtime = open_runtime(directory, manifest, **load)
    try:
        return model(manifest, runtime, **options)
    except BundleError as exc:
        raise BundleError(f"{directory}: {exc}") from None
