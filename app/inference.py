"""Decoded crops -> attribute predictions / re-ID embeddings, in batches.

Everything here is synchronous and CPU-bound; the API calls it from worker threads, never on the event
loop. A request's crops go through the network in batches of ``batch_size``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from app.bundle import BundleError, Manifest, load_bundle, read_manifest
from app.preprocess import image_to_tensor
from app.schema import schema_as_dict

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
        chunk = images[start : start + batch]
        yield torch.stack([image_to_tensor(img, size) for img in chunk])


class _Model:
    task: str

    def __init__(
        self,
        manifest: Manifest,
        net: nn.Module,
        *,
        batch_size: int = 8,
        observer: InferenceObserver | None = None,
    ) -> None:
        self.manifest = manifest
        self.net = net.eval()
        self.device = next(net.parameters()).device
        self.batch_size = batch_size
        self.observer = observer

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.manifest.input_size)  # type: ignore[return-value]

    def _forward(self, batch: torch.Tensor):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.net(batch.to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.observer is not None:
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
            "metrics": m.metrics,
        }


class AttributeModel(_Model):
    """The attribute bundle: per crop, each group's most probable class and its probability."""

    task = "attributes"

    def __init__(self, manifest: Manifest, net: nn.Module, **kwargs) -> None:
        super().__init__(manifest, net, **kwargs)
        schema = manifest.attribute_schema or schema_as_dict()
        self.groups: dict[str, tuple[str, ...]] = {g["name"]: tuple(g["classes"]) for g in schema}
        heads = {name: head[-1].out_features for name, head in net.heads.items()}
        if heads != {name: len(classes) for name, classes in self.groups.items()}:
            raise BundleError(f"{manifest.name}: attribute schema does not match the network's heads")

    def predict(self, images: Sequence[Image.Image]) -> list[Attributes]:
        results: list[Attributes] = []
        for batch in _batches(images, self.input_size, self.batch_size):
            logits = self._forward(batch)
            probs = {name: torch.softmax(logits[name].float(), dim=1).cpu() for name in self.groups}
            for i in range(batch.shape[0]):
                crop: Attributes = {}
                for name, classes in self.groups.items():
                    p, k = probs[name][i].max(dim=0)
                    crop[name] = AttributeValue(classes[int(k)], round(float(p), 6))
                results.append(crop)
        return results


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

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        row = 0
        for batch in _batches(images, self.input_size, self.batch_size):
            emb = self._forward(batch).float().cpu().numpy()
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
        observer: InferenceObserver | None = None,
    ) -> Models:
        options = {"batch_size": batch_size, "observer": observer}
        attributes = AttributeModel(*_load(attribute_dir, "attributes", device), **options)
        reid = ReIDModel(*_load(reid_dir, "reid", device), **options)
        return cls(attributes, reid)


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


def _load(directory: str | Path, task: str, device: str) -> tuple[Manifest, nn.Module]:
    check_bundle(directory, task)
    return load_bundle(directory, device=device)
