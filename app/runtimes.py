"""What runs a bundle's network: its verified ONNX graph on ONNX Runtime, or torch as the fallback.

Both take the same input, uint8 (N, 3, H, W) RGB crops from ``app.preprocess.images_to_batch``, and
return the network's outputs as float32 arrays in the order the manifest names them (the attribute
groups' logits, or the one embedding). torch is imported only when the torch runtime is chosen, so a
service whose bundles carry graphs runs on an install without torch.

Choice (``REID_RUNTIME``): ``onnx`` needs the graph; ``torch`` needs torch; unset means ONNX Runtime
when the bundle has a graph and the device is the CPU, else torch, with a log line saying why. On CUDA
the torch runtime is the default: the service's dependencies hold ONNX Runtime's CPU build, and
``REID_RUNTIME=onnx`` there uses ORT's CUDA provider only where an onnxruntime-gpu build provides it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from app.bundle import BundleError, Manifest, verified_bytes

log = logging.getLogger(__name__)

RuntimeName = Literal["onnx", "torch"]

TORCH_MISSING = (
    "needs the torch runtime, but torch is not installed: install the 'torch' extra "
    "(pip install 'reid-stack[torch]'), or give the bundle an ONNX graph with `reid-train add-onnx`"
)


class Runtime(Protocol):
    """A loaded network: uint8 (N, 3, H, W) in, the manifest's outputs (float32) out."""

    name: RuntimeName

    def run(self, batch: np.ndarray) -> list[np.ndarray]: ...


class OnnxRuntime:
    """One ONNX Runtime session per model, shared by the worker threads (``run`` is thread-safe)."""

    name: RuntimeName = "onnx"

    def __init__(self, directory: Path, manifest: Manifest, *, threads: int, device: str = "cpu") -> None:
        import onnxruntime as ort

        graph = manifest.onnx
        assert graph is not None
        model = verified_bytes(directory, graph.file, graph.sha256, "ONNX graph")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's business
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BundleError(
                    "REID_RUNTIME=onnx on CUDA needs an onnxruntime build with the CUDA provider "
                    "(onnxruntime-gpu); use REID_RUNTIME=torch"
                )
            index = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise BundleError(f"{directory / graph.file}: ONNX Runtime cannot load it: {exc}") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [graph.input] or outputs != graph.outputs:
            raise BundleError(
                f"{directory / graph.file}: graph has inputs {inputs} and outputs {outputs}; "
                f"the manifest says {[graph.input]} and {graph.outputs}"
            )
        self.input = graph.input
        self.outputs = graph.outputs

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input: batch})


class TorchRuntime:
    """The bundle's safetensors weights in the torch network (CUDA, or bundles without a graph)."""

    name: RuntimeName = "torch"

    def __init__(self, directory: Path, manifest: Manifest, *, threads: int, device: str = "cpu") -> None:
        try:
            import torch

            from app.nets.bundles import load_bundle
        except ImportError:
            raise BundleError(f"{directory}: {TORCH_MISSING}") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BundleError(f"REID_DEVICE is {device} but torch sees no CUDA device; use REID_DEVICE=cpu")
        self._torch = torch
        _, self.net = load_bundle(directory, device=device)
        self.device = torch.device(device)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.net(torch.from_numpy(batch).to(self.device))
        tensors = list(out.values()) if isinstance(out, dict) else [out]
        return [t.float().cpu().numpy() for t in tensors]


def choose_runtime(manifest: Manifest, requested: RuntimeName | None, device: str) -> RuntimeName:
    """The runtime a bundle will run on, given ``REID_RUNTIME`` (None: pick) and ``REID_DEVICE``."""
    if requested == "onnx" and manifest.onnx is None:
        raise BundleError(
            f"{manifest.name}: REID_RUNTIME=onnx but the bundle has no ONNX graph; "
            "add one with `reid-train add-onnx <bundle>`, or use REID_RUNTIME=torch"
        )
    if requested is not None:
        return requested
    return "onnx" if manifest.onnx is not None and not device.startswith("cuda") else "torch"


def torch_available() -> bool:
    """Whether torch can be imported (without paying for the import)."""
    if "torch" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


def verify_files(directory: Path, manifest: Manifest, runtime: RuntimeName) -> None:
    """Check the file that ``runtime`` will run against the manifest's sha256 (start-up, before load)."""
    if runtime == "onnx":
        assert manifest.onnx is not None
        verified_bytes(directory, manifest.onnx.file, manifest.onnx.sha256, "ONNX graph")
    else:
        verified_bytes(directory, manifest.weights_file, manifest.weights_sha256, "weights")


def open_runtime(
    directory: Path, manifest: Manifest, *, requested: RuntimeName | None, device: str, threads: int
) -> Runtime:
    """Load the bundle's network on the chosen runtime."""
    name = choose_runtime(manifest, requested, device)
    if requested is None and name == "torch":  # said once, here, not by every caller of the choice
        if manifest.onnx is None:
            log.warning("%s: the bundle has no ONNX graph; running it on torch", manifest.name)
        else:
            log.info("%s: REID_DEVICE=%s, running it on torch", manifest.name, device)
    runtime = OnnxRuntime if name == "onnx" else TorchRuntime
    return runtime(directory, manifest, threads=threads, device=device)
