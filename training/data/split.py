"""Identity-disjoint train/validation split, stratified over the attribute classes (the report's method).

Every identity lands on exactly one side, in three steps:

1. Classes are visited from the rarest to the most common (over all 12 groups); the identities of a
   class that are still unassigned are shuffled and divided so that the class's validation share
   approaches ``val_fraction``, keeping at least one identity of the class on each side.
2. Repair: a class with two or more identities that still sits on one side only gets one of them moved
   across, if that empties no other class on its side.
3. Balance: identities are moved (again without emptying a class on either side) until validation holds
   ``round(val_fraction * n)`` identities.

So every class of every group is on both sides whenever the data allows (Market-1501 has
one class with a single identity: lower colour purple). Identities without labels (a re-ID-only split)
take part in step 3 only. The result is saved as JSON and reused by both tasks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from app.attribute_schema import ATTRIBUTE_GROUPS, Labels

S = TypeVar("S")


@dataclass
class Split:
    """Identity lists for training and validation, and how they were made."""

    train_ids: list[int]
    val_ids: list[int]
    seed: int = 0
    val_fraction: float = 0.2
    data_fingerprint: str = ""

    def __post_init__(self) -> None:
        self.train_ids = sorted(int(i) for i in self.train_ids)
        self.val_ids = sorted(int(i) for i in self.val_ids)
        overlap = set(self.train_ids) & set(self.val_ids)
        if overlap:
            raise ValueError(f"split is not identity-disjoint: {sorted(overlap)[:10]}")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a split file ({exc})") from None

    def partition(self, samples: Iterable[S], pid_of=lambda s: s.pid) -> tuple[list[S], list[S]]:
        """Samples of the training and of the validation identities (others are dropped)."""
        train_ids, val_ids = set(self.train_ids), set(self.val_ids)
        train, val = [], []
        for sample in samples:
            pid = pid_of(sample)
            if pid in train_ids:
                train.append(sample)
            elif pid in val_ids:
                val.append(sample)
        return train, val


def split_identities(
    labels: Mapping[int, Labels], val_fraction: float = 0.2, seed: int = 0, data_fingerprint: str = ""
) -> Split:
    """Split the identities of ``labels`` (pid -> labels; empty labels for unlabelled ids)."""
    rng = random.Random(seed)
    classes = {
        pid: [(g.name, lab[g.name]) for g in ATTRIBUTE_GROUPS] if lab else [] for pid, lab in labels.items()
    }
    members: dict[tuple[str, int], list[int]] = {}
    for pid in sorted(classes):
        for key in classes[pid]:
            members.setdefault(key, []).append(pid)
    side: dict[int, str] = {}

    # 1. Rarest class first: divide its unassigned identities towards val_fraction, one on each side.
    for key in sorted(members, key=lambda k: (len(members[k]), k)):
        pids = members[key]
        n_val = sum(side.get(p) == "val" for p in pids)
        n_train = sum(side.get(p) == "train" for p in pids)
        free = [p for p in pids if p not in side]
        rng.shuffle(free)
        want_val = max(1, round(val_fraction * len(pids))) if len(pids) >= 2 else 0
        take = min(max(want_val - n_val, 0), len(free))
        if n_train == 0 and take == len(free) and take > 0:
            take -= 1  # keep one on the training side
        for p in free[:take]:
            side[p] = "val"
        for p in free[take:]:
            side[p] = "train"
    rest = sorted(p for p in labels if p not in side)
    rng.shuffle(rest)
    for p in rest:
        side[p] = "train"

    def count(key: tuple[str, int], where: str) -> int:
        return sum(side[p] == where for p in members[key])

    def movable(pid: int) -> bool:
        """Moving ``pid`` to the other side leaves each of its classes on its current side."""
        return all(count(key, side[pid]) >= 2 for key in classes[pid])

    # 2. Repair: a class with two or more identities all on one side gets one moved across.
    for key in sorted(members, key=lambda k: (len(members[k]), k)):
        for other in ("val", "train"):
            if len(members[key]) >= 2 and count(key, other) == 0:
                candidates = [p for p in members[key] if movable(p)]
                if candidates:
                    side[rng.choice(candidates)] = other

    # 3. Balance: move identities whose move breaks no coverage until val has its share.
    target = round(val_fraction * len(labels))
    for _ in range(2):
        excess = sum(v == "val" for v in side.values()) - target
        if excess == 0:
            break
        source, dest = ("val", "train") if excess > 0 else ("train", "val")
        pool = sorted(p for p, v in side.items() if v == source)
        rng.shuffle(pool)
        for p in pool:
            if excess == 0:
                break
            if movable(p):
                side[p] = dest
                excess -= 1 if excess > 0 else -1
    return Split(
        train_ids=[p for p, v in side.items() if v == "train"],
        val_ids=[p for p, v in side.items() if v == "val"],
        seed=seed,
        val_fraction=val_fraction,
        data_fingerprint=data_fingerprint,
    )


def coverage_gaps(split: Split, labels: Mapping[int, Labels]) -> list[str]:
    """``group=class`` names present in the data but missing from one side of the split."""
    gaps = []
    for g in ATTRIBUTE_GROUPS:
        for c, name in enumerate(g.classes):
            sides = [
                any(labels[p][g.name] == c for p in ids if labels.get(p))
                for ids in (split.train_ids, split.val_ids)
            ]
            if any(sides) and not all(sides):
                gaps.append(f"{g.name}={name}")
    return gaps


def resolve_split(
    labels: Mapping[int, Labels],
    *,
    split_file: str | Path | None,
    run_dir: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    data_fingerprint: str = "",
) -> Split:
    """Reuse ``split_file`` when it exists (restricted to the identities at hand), else make a split and
    write it there (or to ``run_dir/split.json``). A copy always lands in ``run_dir/split.json``."""
    path = Path(split_file) if split_file else None
    if path is not None and path.is_file():
        saved = Split.load(path)
        present = set(labels)
        split = Split(
            [p for p in saved.train_ids if p in present],
            [p for p in saved.val_ids if p in present],
            saved.seed,
            saved.val_fraction,
            saved.data_fingerprint,
        )
        unknown = sorted(present - set(split.train_ids) - set(split.val_ids))
        if unknown:
            raise ValueError(f"{path}: identities {unknown[:10]} are in the data but not in the split")
        if not split.train_ids or not split.val_ids:
            raise ValueError(f"{path}: the split leaves no training or no validation identity in this data")
    else:
        split = split_identities(labels, val_fraction, seed, data_fingerprint)
        if path is not None:
            split.save(path)
    split.save(Path(run_dir) / "split.json")
    return split
