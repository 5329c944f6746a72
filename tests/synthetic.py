"""Tiny generated Market-1501-style datasets whose attributes and identities are drawn in the pixels.

Each identity gets random attribute labels from the schema and a random identity texture. The image
shows the labels so a model can learn them: the upper half is the upper colour, the lower half the
lower colour (two colours in stripes for 'multicolour'), a barcode strip on the left holds the binary
attributes and the age, and a per-identity block pattern on the right makes identities separable for
re-ID. Each image adds a small shift, camera brightness and noise.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.attribute_schema import ATTRIBUTE_GROUPS, CSV_COLUMNS, Labels, row_from_labels

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "red": (220, 30, 30),
    "purple": (130, 40, 160),
    "yellow": (230, 220, 40),
    "gray": (128, 128, 128),
    "blue": (30, 60, 220),
    "green": (40, 170, 50),
    "pink": (250, 150, 200),
    "brown": (120, 70, 20),
}


@dataclass
class SyntheticIdentity:
    """One generated person: pid, attribute labels, identity texture."""

    pid: int
    labels: Labels
    texture: np.ndarray  # (4, 2) block pattern of grey levels


def make_identities(n: int, seed: int = 0, first_pid: int = 1) -> list[SyntheticIdentity]:
    """Random labels per identity; classes cycle so every class of every group appears."""
    rng = np.random.default_rng(seed)
    people = []
    for i in range(n):
        labels = {
            g.name: int((i + rng.integers(0, 2)) % g.num_classes)
            if g.num_classes > 2
            else int(rng.integers(0, 2))
            for g in ATTRIBUTE_GROUPS
        }
        people.append(SyntheticIdentity(first_pid + i, labels, rng.integers(0, 256, size=(4, 2))))
    return people


def _fill(area: np.ndarray, group: str, index: int) -> None:
    classes = next(g.classes for g in ATTRIBUTE_GROUPS if g.name == group)
    name = classes[index]
    if name == "multicolour":
        area[0::4] = COLOURS["red"]
        area[1::4] = COLOURS["red"]
        area[2::4] = COLOURS["blue"]
        area[3::4] = COLOURS["blue"]
    else:
        area[:] = COLOURS[name]


def render(
    person: SyntheticIdentity, cam: int, rng: np.random.Generator, size: tuple[int, int] = (64, 32)
) -> Image.Image:
    """Draw one crop of ``person`` seen by camera ``cam``."""
    h, w = size
    img = np.zeros((h, w, 3), dtype=np.float32)
    body = slice(w // 4, 3 * w // 4)
    _fill(img[: h // 2, body], "upper_colour", person.labels["upper_colour"])
    _fill(img[h // 2 :, body], "lower_colour", person.labels["lower_colour"])
    bits = [person.labels[g.name] for g in ATTRIBUTE_GROUPS if g.num_classes == 2]
    bits += [person.labels["age"] // 2, person.labels["age"] % 2]
    cell = h // len(bits)
    for k, bit in enumerate(bits):
        img[k * cell : (k + 1) * cell, : w // 4] = 250 if bit else 5
    tex = np.kron(person.texture, np.ones((h // 4, (w - 3 * w // 4) // 2)))
    img[: tex.shape[0], 3 * w // 4 : 3 * w // 4 + tex.shape[1]] = tex[..., None]
    img = img * (0.85 + 0.05 * cam) + rng.normal(0, 6, img.shape)
    img = np.roll(img, int(rng.integers(-2, 3)), axis=0)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


def make_course_dataset(
    root: str | Path,
    n_ids: int = 12,
    images_per_id: int = 6,
    cams: int = 3,
    size: tuple[int, int] = (64, 32),
    seed: int = 0,
) -> list[SyntheticIdentity]:
    """Write ``train/PID_cCAM_NUMBER.jpg`` and ``annotations_train.csv`` (the course layout)."""
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    people = make_identities(n_ids, seed)
    for p in people:
        for k in range(images_per_id):
            cam = 1 + k % cams
            _write(root / "train" / f"{p.pid:04d}_c{cam}_{k:09d}.jpg", render(p, cam, rng, size))
    with (root / "annotations_train.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for p in people:
            writer.writerow(row_from_labels(p.labels, str(p.pid)))
    return people


def make_original_dataset(
    root: str | Path,
    n_train: int = 8,
    n_test: int = 6,
    images_per_id: int = 6,
    cams: int = 3,
    size: tuple[int, int] = (64, 32),
    seed: int = 0,
) -> tuple[list[SyntheticIdentity], list[SyntheticIdentity]]:
    """Write the original layout (bounding_box_train/test, query, market_attribute.mat).

    Test also gets one junk (pid -1) and one distractor (pid 0000) image, as in Market-1501.
    """
    from scipy.io import savemat

    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    train = make_identities(n_train, seed, first_pid=2)
    test = make_identities(n_test, seed + 7, first_pid=2 + 2 * n_train)
    for p in train:
        for k in range(images_per_id):
            cam = 1 + k % cams
            name = f"{p.pid:04d}_c{cam}s1_{k * 25:06d}_0{k % 3}.jpg"
            _write(root / "bounding_box_train" / name, render(p, cam, rng, size))
    for p in test:
        for k in range(images_per_id):
            cam = 1 + k % cams
            folder = "query" if k < cams else "bounding_box_test"
            name = f"{p.pid:04d}_c{cam}s2_{k * 25:06d}_00.jpg"
            _write(root / folder / name, render(p, cam, rng, size))
    noise = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    _write(root / "bounding_box_test" / "-1_c1s1_000001_00.jpg", noise)
    _write(root / "bounding_box_test" / "0000_c2s1_000002_00.jpg", noise)

    def as_struct(people: list[SyntheticIdentity]) -> dict[str, object]:
        rows = [row_from_labels(p.labels, f"{p.pid:04d}") for p in people]
        struct: dict[str, object] = {
            c: np.array([[int(r[c]) for r in rows]], dtype=np.uint8) for c in CSV_COLUMNS[1:]
        }
        index = np.empty((1, len(rows)), dtype=object)
        index[0, :] = [r["id"] for r in rows]
        struct["image_index"] = index
        return struct

    savemat(
        root / "market_attribute.mat",
        {"market_attribute": {"train": as_struct(train), "test": as_struct(test)}},
    )
    return train, test
