"""Training-step speed of the re-ID network in fp32 against bf16 autocast, in one run.

    python benchmarks/train_step.py --threads 2 --batch 64 --steps 8 [--input-size 256x128]

One step = augmentation, forward, the recipe's losses, backward and Adam, as ``reid-train train-reid``
runs it (two-branch OSNet x0.25, random uint8 crops, 64 classes). Steps alternate between the
precisions so that a machine whose speed drifts affects both alike; the first two steps of each are
warm-up and not timed. Prints crops/s per precision and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from app.nets.reid import ReIDNet, ReIDNetConfig
from training.data.transforms import BatchAugment
from training.losses import batch_hard_triplet_loss, identity_loss


def main() -> None:
    """Time alternating fp32 and bf16 steps; print crops/s of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision")
    parser.add_argument("--input-size", default="256x128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.input_size.split("x"))
    torch.manual_seed(0)
    models, optims = {}, {}
    for precision in ("fp32", "bf16"):
        net = ReIDNet(
            ReIDNetConfig(backbone="osnet_x0_25", input_size=(height, width), num_classes=64, branch_dim=256)
        ).to(memory_format=torch.channels_last)
        models[precision] = net.train()
        optims[precision] = torch.optim.Adam(net.parameters(), lr=3.5e-4)
    augment = BatchAugment(flip_p=0.5, pad=10, erase_p=0.5, channels_last=True)
    images = torch.randint(0, 256, (args.batch, 3, height, width), dtype=torch.uint8)
    labels = torch.arange(args.batch) // 4
    seconds = {"fp32": 0.0, "bf16": 0.0}
    for step in range(args.steps + 2):
        for precision, model in models.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(augment(images))
                loss = sum(batch_hard_triplet_loss(f, labels, margin=0.3) for f in out.features.values())
                loss = loss + sum(identity_loss(lg, labels, 0.1) for lg in out.logits.values())
            optims[precision].zero_grad(set_to_none=True)
            loss.backward()
            optims[precision].step()
            if step >= 2:
                seconds[precision] += time.perf_counter() - start
    rate = {p: args.steps * args.batch / s for p, s in seconds.items()}
    print(
        f"{args.input_size}, batch {args.batch}, {args.threads} threads, {args.steps} steps each: "
        f"fp32 {rate['fp32']:.1f} crops/s, bf16 {rate['bf16']:.1f} crops/s, "
        f"bf16 / fp32 {rate['bf16'] / rate['fp32']:.2f}x"
    )


if __name__ == "__main__":
    main()
