"""A bundle's network as an ONNX graph (``model.onnx``), checked against torch before it is recorded.

The graph takes what the service's preprocessing makes, uint8 (batch, 3, H, W) RGB crops with a dynamic
batch axis, and normalises inside (the network's own ``Normalize``), so the service needs neither torch
nor the mean and std. Outputs are named after what they hold: one per attribute group (the manifest
schema's order), or ``embedding`` for re-ID. After writing, the graph runs on ONNX Runtime next to the
torch network on a fixed batch; a difference over ``tolerance`` fails the export and leaves no graph.

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)``. On these networks it gives the
same graph quality on ONNX Runtime as the dynamo exporter (whose optimiser ORT repeats anyway), exports
in under a second rather than 10 s, and needs no onnxscript.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.bundle import (
    ONNX_GRAPH,
    ONNX_INPUT,
    BundleError,
    Manifest,
    OnnxGraph,
    file_sha256,
    read_manifest,
    replace_file,
    write_manifest,
)
from app.nets.bundles import load_bundle

DEFAULT_OPSET = 18
TOLERANCE = 1e-4
CHECK_BATCH = 8


class OnnxExportError(RuntimeError):
    """The graph could not be written, or does not compute what the torch network computes."""


class _Outputs(nn.Module):
    """The network with its outputs as a tuple in the manifest's order (ONNX has no dict outputs)."""

    def __init__(self, net: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.net = net
        self.names = names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(images)
        return tuple(out[n] for n in self.names) if isinstance(out, dict) else (out,)


def output_names(manifest: Manifest) -> list[str]:
    """The graph's outputs: the attribute groups in schema order, or the one embedding."""
    if manifest.task == "attributes":
        return [group["name"] for group in manifest.attribute_schema or []]
    return ["embedding"]


def check_batch(size: tuple[int, int], n: int = CHECK_BATCH, seed: int = 0) -> np.ndarray:
    """A fixed uint8 batch: smooth gradients under noise, so activations are not degenerate."""
    rng = np.random.default_rng(seed)
    height, width = size
    ramp = np.linspace(0, 255, height * width, dtype=np.float32).reshape(1, 1, height, width)
    noise = rng.normal(0, 60, (n, 3, height, width)).astype(np.float32)
    return np.clip(ramp * rng.uniform(0.3, 1.0, (n, 3, 1, 1)) + noise, 0, 255).astype(np.uint8)


def to_onnx(net: nn.Module, manifest: Manifest, opset: int = DEFAULT_OPSET) -> bytes:
    """Trace ``net`` (eval mode) into an ONNX graph with a dynamic batch axis."""
    names = output_names(manifest)
    wrapped = _Outputs(net.eval(), names).eval()
    example = torch.from_numpy(check_batch(tuple(manifest.input_size), 2))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapped,
            (example,),
            buffer,
            input_names=[ONNX_INPUT],
            output_names=names,
            dynamic_axes={ONNX_INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def max_difference(graph: bytes, net: nn.Module, manifest: Manifest, batch: np.ndarray) -> float:
    """Largest |ONNX Runtime - torch| over all outputs on ``batch``."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    ours = session.run(None, {ONNX_INPUT: batch})
    with torch.no_grad():
        theirs = _Outputs(net.eval(), output_names(manifest))(torch.from_numpy(batch))
    return max(float(np.abs(a - b.numpy()).max()) for a, b in zip(ours, theirs, strict=True))


def add_onnx(
    directory: str | Path,
    *,
    net: nn.Module | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = TOLERANCE,
) -> Manifest:
    """Write ``<bundle>/model.onnx`` from the bundle's own weights, check it, record it in the manifest.

    ``net`` (optional) is the already loaded network of this bundle; by default it is loaded from the
    bundle, so the graph always computes what the bundle's weights compute.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if net is None:
        manifest, net = load_bundle(directory)
    if manifest.task == "attributes" and not manifest.attribute_schema:
        raise BundleError(f"{directory}: attribute manifest has no attribute_schema to name the outputs")
    graph = to_onnx(net, manifest, opset)
    batch = check_batch(tuple(manifest.input_size))
    difference = max_difference(graph, net, manifest, batch)
    if not difference <= tolerance:  # also catches NaN
        raise OnnxExportError(
            f"{directory}: the ONNX graph differs from the torch network by {difference:.3g} "
            f"(tolerance {tolerance:g}); no graph written"
        )
    path = directory / ONNX_GRAPH
    replace_file(path, graph)
    record = OnnxGraph(
        sha256=file_sha256(path),
        opset=opset,
        outputs=output_names(manifest),
        max_abs_diff=difference,
        check_batch=len(batch),
        exporter=f"torch {torch.__version__}, torch.onnx.export(dynamo=False)",
    )
    manifest = manifest.model_copy(update={"onnx": record})
    write_manifest(directory, manifest)
    return manifest


class OnnxModule(nn.Module):
    """A bundle's verified ONNX graph on ONNX Runtime behind the ``nn.Module`` call that evaluation uses:
    what is measured is what the service runs (and about 5x faster than eager torch on a CPU)."""

    def __init__(self, directory: str | Path, threads: int = 0) -> None:
        super().__init__()
        from app.runtimes import OnnxRuntime

        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.onnx is None:
            raise BundleError(f"{directory}: no ONNX graph (add one with `reid-train add-onnx`)")
        self.runtime = OnnxRuntime(directory, manifest, threads=threads or torch.get_num_threads())
        self.names = manifest.onnx.outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        batch = np.ascontiguousarray(images.detach().cpu().numpy())
        if batch.dtype != np.uint8:  # [0, 1] floats from an augmentation-free pipeline
            batch = np.clip(np.rint(batch * 255.0), 0, 255).astype(np.uint8)
        outputs = [torch.from_numpy(o) for o in self.runtime.run(batch)]
        return outputs[0] if self.names == ["embedding"] else dict(zip(self.names, outputs, strict=True))
