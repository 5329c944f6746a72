"""Model-only CPU speed (a script, not a test): crops/s of bundles and of candidate architectures.

Each network gets uint8 crops already resized to its input size, in batches of ``--batch`` under
``torch.inference_mode()``, with ``--threads`` torch threads; the figure is batch / median batch time
over ``--repeats`` batches after two warm-up batches. The report's ResNet50 at 256x128 is measured in
the same run as the baseline. Prints a markdown table.

    .venv/bin/python benchmarks/model_speed.py --bundle models_store/attributes --bundle models_store/reid
    .venv/bin/python benchmarks/model_speed.py --arch reid:osnet_x0_25:128x64 --arch reid:osnet_x0_25:256x128
    # bundles' ONNX graphs on ONNX Runtime too (what the service runs), same batch and threads
    .venv/bin/python benchmarks/model_speed.py --onnx --bundle models_store/reid \
        --bundle models_store/reid-flip
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.nets.attributes import AttributeNetConfig  # noqa: E402
from app.nets.bundles import build_network, load_bundle  # noqa: E402
from app.nets.reid import ReIDNetConfig  # noqa: E402

BASELINE = "reid:resnet50:256x128"


def arch_network(spec: str) -> tuple[str, nn.Module, tuple[int, int]]:
    """``task:backbone:HxW`` -> a random-weight network (speed does not depend on the weights)."""
    task, backbone, size = spec.split(":")
    h, w = (int(v) for v in size.lower().split("x"))
    config = (ReIDNetConfig if task == "reid" else AttributeNetConfig)(backbone=backbone, input_size=(h, w))
    return f"{task} {backbone} {h}x{w} (random weights)", build_network(task, config.to_dict()).eval(), (h, w)


def crops_per_second(model: nn.Module, size: tuple[int, int], batch: int, repeats: int) -> float:
    """Batch / median time of one forward pass over ``batch`` uint8 crops."""
    x = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    model = model.to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def onnx_crops_per_second(
    directory: str, size: tuple[int, int], batch: int, threads: int, repeats: int
) -> float:
    """Batch / median time of the bundle's ONNX graph on ONNX Runtime over ``batch`` uint8 crops."""
    import numpy as np
    import onnxruntime as ort

    from app.bundle import read_manifest

    manifest = read_manifest(directory)
    if manifest.onnx is None:
        return float("nan")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(
        str(Path(directory) / manifest.onnx.file), options, providers=["CPUExecutionProvider"]
    )
    feed = {
        session.get_inputs()[0].name: np.random.default_rng(0).integers(0, 256, (batch, 3, *size), np.uint8)
    }
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", default=[], help="bundle directory (repeatable)")
    parser.add_argument("--arch", action="append", default=[], help="task:backbone:HxW (repeatable)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--onnx", action="store_true", help="also time each bundle's ONNX graph")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows: list[tuple[str, float]] = []
    for spec in [BASELINE, *args.arch]:
        name, model, size = arch_network(spec)
        rows.append((name, crops_per_second(model, size, args.batch, args.repeats)))
    for directory in args.bundle:
        manifest, model = load_bundle(directory)
        h, w = manifest.input_size
        name = f"bundle {Path(directory).name}: {manifest.task} {manifest.backbone} {h}x{w}"
        rows.append((name, crops_per_second(model, manifest.input_size, args.batch, args.repeats)))
        if args.onnx:
            rate = onnx_crops_per_second(
                directory, manifest.input_size, args.batch, args.threads, args.repeats
            )
            rows.append((f"{name}, ONNX Runtime", rate))

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {cpu}")
    print("| network | crops/s | vs baseline |")
    print("|---|---|---|")
    base = rows[0][1]
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
