"""Which frozen representation predicts the attributes best? Linear probes on the committed split.

For each candidate feature extractor, the features of every training-split image train one logistic
regression per attribute group (scikit-learn, standardised features, C = 0.05); the validation split is
scored with the product's metrics (mean accuracy over the 12 groups, mA). This is the measurement behind
warm-starting the attribute network from the re-ID bundle (``training/warm_start.py``).

    .venv/bin/python benchmarks/attribute_probe.py --data-root $REID_DATA_ROOT --weights ../shared/weights \
        --reid-bundle models_store/reid --attribute-bundle models_store/attributes
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.attribute_schema import ATTRIBUTE_GROUPS  # noqa: E402
from app.nets.attributes import AttributeNet, AttributeNetConfig  # noqa: E402
from app.nets.bundles import load_bundle  # noqa: E402
from training.config import AttributeTrainConfig  # noqa: E402
from training.data.transforms import to_model_input  # noqa: E402
from training.evaluation.attributes import AttributeEvaluator  # noqa: E402
from training.tasks.attributes import load_attribute_data  # noqa: E402

Extractor = Callable[[torch.Tensor], torch.Tensor]


def pooled(net: AttributeNet) -> Extractor:
    """The globally pooled backbone features of an attribute network (what its heads see)."""
    net.eval()
    return lambda x: net.pool(net.last_stage(net.trunk(net.normalize(x)))).flatten(1)


@torch.no_grad()
def features(extract: Extractor, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Features of uint8 images, batch by batch."""
    parts = [
        extract(to_model_input(images[s : s + batch], "cpu", False)).float()
        for s in range(0, len(images), batch)
    ]
    return torch.cat(parts).numpy()


def probe(
    train: np.ndarray, val: np.ndarray, y_train: torch.Tensor, y_val: torch.Tensor, balanced: bool
) -> dict:
    """One logistic regression per group on standardised features; the validation metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    train, val = scaler.transform(train), scaler.transform(val)
    predictions = []
    for j, _ in enumerate(ATTRIBUTE_GROUPS):
        clf = LogisticRegression(max_iter=300, C=0.05, class_weight="balanced" if balanced else None)
        predictions.append(torch.as_tensor(clf.fit(train, y_train[:, j].numpy()).predict(val)))
    evaluator = AttributeEvaluator()
    evaluator.process_predictions(torch.stack(predictions, 1), y_val)
    return evaluator.evaluate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--weights", required=True, help="folder with the two shared weight files")
    parser.add_argument("--reid-bundle", default="models_store/reid")
    parser.add_argument("--attribute-bundle", default=None, help="also probe this bundle's features")
    parser.add_argument("--split-file", default=str(ROOT / "splits/market1501-course-seed0.json"))
    parser.add_argument("--input-size", default="128x64")
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message="lbfgs failed to converge")  # C is small; 300 steps suffice
    size = tuple(int(v) for v in args.input_size.split("x"))
    config = AttributeTrainConfig(
        data_root=args.data_root, input_size=size, split_file=args.split_file, cache_dir=args.cache_dir,
        progress=False,
    )  # fmt: skip
    data = load_attribute_data(config, Path(args.cache_dir) / "probe-run")
    weights = Path(args.weights)
    candidates: dict[str, Extractor] = {
        "MobileNetV2, ImageNet": pooled(
            AttributeNet(
                AttributeNetConfig("mobilenet_v2", size), str(weights / "mobilenet_v2_imagenet_features.pth")
            )
        ),
        "OSNet x0.25, MSMT17": pooled(
            AttributeNet(AttributeNetConfig("osnet_x0_25", size), str(weights / "osnet_x0_25_msmt17.pth"))
        ),
        f"re-ID bundle embedding ({args.reid_bundle})": load_bundle(args.reid_bundle)[1],
    }
    if args.attribute_bundle:
        candidates[f"attribute bundle features ({args.attribute_bundle})"] = pooled(
            load_bundle(args.attribute_bundle)[1]
        )
    print("| features | dim | class weights | mean accuracy | mA | seconds |\n|---|---|---|---|---|---|")
    for name, extract in candidates.items():
        started = time.perf_counter()
        train, val = features(extract, data.train_images), features(extract, data.val_images)
        for balanced in (False, True):
            m = probe(train, val, data.train_labels, data.val_labels, balanced)
            weighting = "balanced" if balanced else "none"
            print(
                f"| {name} | {train.shape[1]} | {weighting} | {m['mean_accuracy']:.3f} | {m['mA']:.3f} "
                f"| {time.perf_counter() - started:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
