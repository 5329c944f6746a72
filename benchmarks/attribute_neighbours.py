"""How many re-ID neighbours, what weights and what similarity floor for attributes averaged over
neighbours, on the distractor validation, in a dense folder and in sparse ones (a script, not a test;
docs/models.md, *Attributes from several crops*).

    # once per pair of split bundles: logits and embeddings of the validation crops and the distractors
    python benchmarks/attribute_neighbours.py dump runs/bundles/attributes-fast-split \
        runs/bundles/reid-fast-split /tmp/pair.npz --data-root $REID_DATA_ROOT
    python benchmarks/attribute_neighbours.py score /tmp/pair.npz

Settings scored: "dense" is every validation crop among the 19,679 distractors (what the course test/
folder is: about 26 crops per person); "sparse" keeps one crop per identity and camera (about 4 per
person), alone and among the distractors. Metrics: mean accuracy / mA / mA over the two-class groups,
the bundle's own decision rule (no taus re-chosen), over the crops each setting keeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLIT = ROOT / "splits" / "market1501-course-seed0.json"
KEYS = ("mean_accuracy", "mA", "mA_two_class")


def dump(args: argparse.Namespace) -> None:
    """Save the attribute logits, re-ID embeddings, labels, identities and cameras."""
    from training.cli.attribute_neighbours import _validation_outputs

    logits, embeddings, labels, pids, cams, priors = _validation_outputs(
        args.attributes, args.reid, args.data_root, SPLIT, args.data_root / "test", args.cache, 0, False
    )
    saved = {f"logits_{k}": v for k, v in logits.items()}
    saved.update({f"prior_{k}": np.asarray(v) for k, v in priors.items()})
    np.savez(args.out, embeddings=embeddings, labels=labels, pids=pids, cams=cams, **saved)


def score(args: argparse.Namespace) -> None:
    """Print the grid: neighbours, weights and floors, per setting."""
    import torch

    from training.attribute_neighbours import impostor_similarity, nearest_neighbours, smoothed_log_probs
    from training.evaluation.attributes import AttributeEvaluator

    saved = np.load(args.pair)
    names = [k[len("logits_") :] for k in saved.files if k.startswith("logits_")]
    logits = {k: saved[f"logits_{k}"] for k in names}
    emb, labels, pids, cams = saved["embeddings"], saved["labels"], saved["pids"], saved["cams"]
    n = len(labels)
    _, first = np.unique(pids * 1000 + cams, return_index=True)
    floors = {rate: impostor_similarity(emb[:n], emb[n:], rate) for rate in (1e-3, 5e-4, 1e-4)}
    settings = {
        "dense: every validation crop + distractors": np.arange(len(emb)),
        "sparse: one crop per identity and camera": first,
        "sparse + distractors": np.concatenate([first, np.arange(n, len(emb))]),
    }
    for title, rows in settings.items():
        labelled = int((rows < n).sum())
        y = torch.as_tensor(labels[rows[:labelled]])
        scores = {k: v[rows] for k, v in logits.items()}

        def metrics(s: dict[str, np.ndarray], y: torch.Tensor = y, m: int = labelled) -> str:
            evaluator = AttributeEvaluator()
            evaluator.process({k: torch.from_numpy(np.ascontiguousarray(v[:m])) for k, v in s.items()}, y)
            r = evaluator.evaluate()
            return " / ".join(f"{r[k]:.4f}" for k in KEYS)

        print(f"{title} ({labelled} labelled of {len(rows)})\n  {'own outputs':44} {metrics(scores)}")
        for k in args.neighbours:
            idx, sims = nearest_neighbours(emb[rows], k)
            for alpha in args.alpha:
                for rate, floor in [(0, 0.0), *floors.items()]:
                    label = f"{k} neighbours, sim^{alpha:g}, floor {floor:.3f} ({rate:g})"
                    print(f"  {label:44} {metrics(smoothed_log_probs(scores, idx, sims, alpha, floor))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("attributes", type=Path)
    d.add_argument("reid", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--data-root", type=Path, required=True)
    d.add_argument("--cache", type=Path, default=ROOT / "cache")
    s = sub.add_parser("score")
    s.add_argument("pair", type=Path)
    s.add_argument("--neighbours", type=int, nargs="+", default=[10, 20, 30])
    s.add_argument("--alpha", type=float, nargs="+", default=[1.0])
    args = parser.parse_args()
    dump(args) if args.command == "dump" else score(args)


if __name__ == "__main__":
    main()
