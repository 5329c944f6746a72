"""Test-time flip for an attribute run: its best checkpoint's validation logits with and without the
mirror image's averaged in, at tau 0 and with the per-group decision rule re-chosen for each (a
script, not a test; docs/models.md, "Attributes: a decision rule per group, APR, every identity").

    python benchmarks/attribute_flip.py runs/attributes-osnet-128x64 --threads 1 [--checkpoint last.pt]

The run's own split and decoded-image cache are used (``REID_DATA_ROOT`` where its config's data
root is not on this machine).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("mean_accuracy", "mA", "mA_two_class")


def main() -> None:
    """Print tau-0 and per-group metrics of plain and flip-averaged logits."""
    import torch

    from training.config import AttributeTrainConfig
    from training.engine import BEST, CONFIG_FILE, load_checkpoint
    from training.evaluation.attributes import (
        adjusted_metrics,
        log_priors,
        logit_adjustment_tradeoff,
        per_group_taus,
    )
    from training.tasks.attributes import AttributeTask, build_attribute_net, load_attribute_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--checkpoint", default=BEST, help="the run's checkpoint file (last.pt: its last epoch)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = AttributeTrainConfig.load(args.run_dir / CONFIG_FILE).replace(progress=False)
    if "REID_DATA_ROOT" in os.environ:
        config = config.replace(data_root=os.environ["REID_DATA_ROOT"])
    data = load_attribute_data(config, args.run_dir)
    task = AttributeTask(config, data, model=build_attribute_net(config.replace(init_weights=None)))
    task.model.load_state_dict(load_checkpoint(args.run_dir / args.checkpoint)["model"])
    plain, labels = task.validation_logits()
    original = data.val_images
    data.val_images = original.flip(-1)  # (N, C, H, W): mirror left and right
    mirrored, _ = task.validation_logits()
    data.val_images = original
    priors = log_priors(data.train_labels)
    flipped = {name: (plain[name] + mirrored[name]) / 2 for name in plain}
    print(f"{args.run_dir / args.checkpoint}: {len(labels)} validation images; mean acc. / mA / mA_two_class")
    for name, logits in (("plain", plain), ("flip (logits averaged)", flipped)):
        tradeoff = logit_adjustment_tradeoff(logits, labels, priors)
        taus = per_group_taus(tradeoff)
        rule = adjusted_metrics(logits, labels, priors, taus)
        print(
            f"  {name:24s} tau 0: {' / '.join(f'{tradeoff[0][k]:.4f}' for k in KEYS)}"
            f"   per group: {' / '.join(f'{rule[k]:.4f}' for k in KEYS)}"
        )
        print(f"  {'':24s} taus {taus}")


if __name__ == "__main__":
    main()
