"""Market-1501 in its two layouts: file lists with identity and camera, attribute labels, a fingerprint.

Layouts (``LAYOUTS`` maps each name to its reader; ``load_market(root, "auto")`` picks by what is there):

- ``course``: ``train/PID_cCAM_NUMBER.jpg`` and ``annotations_train.csv`` (one row per training
  identity). ``test/`` and ``queries/`` hold unlabelled crops (``000000.jpg``...), so the course layout
  has labelled training samples only; ``query`` and ``gallery`` stay empty.
- ``original``: ``bounding_box_train/``, ``bounding_box_test/`` and ``query/`` with names
  ``PID_cCsS_FRAME_BB.jpg`` (pid ``-1`` = junk, ``0000`` = distractor; both kept in the gallery with
  those pids, for the evaluation to handle) and ``market_attribute.mat`` (attributes of the train and
  test identities; read with scipy, imported only here).

Camera ids are kept as written in the file name (1-6). Files that are not images (``Thumbs.db``) are
skipped; an image whose name does not parse, or a training identity without annotation, raises
:class:`DataError` naming the file. Unreadable images are reported, with their path, when the cache
decodes them (``app.preprocess.load_image_file``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.attribute_schema import CSV_COLUMNS, AnnotationError, Labels, labels_from_row

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COURSE_NAME = re.compile(r"^(\d+)_c(\d+)_(\d+)$")
ORIGINAL_NAME = re.compile(r"^(-1|\d+)_c(\d+)s(\d+)_(\d+)_(\d+)$")


class DataError(ValueError):
    """A dataset that does not fit its layout; the message names the file."""


@dataclass(frozen=True)
class Sample:
    """One image: its path, person id and camera id (as in the file name)."""

    path: Path
    pid: int
    camid: int


@dataclass
class MarketData:
    """A dataset read from disk: labelled samples per split, attributes per identity, a fingerprint."""

    root: Path
    layout: str
    train: list[Sample]
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    attributes: dict[int, Labels] = field(default_factory=dict)  # pid -> class index per group
    fingerprint: str = ""

    @property
    def train_ids(self) -> list[int]:
        return sorted({s.pid for s in self.train})

    def limit_train_ids(self, n: int | None, seed: int = 0) -> MarketData:
        """A copy keeping the training samples of ``n`` identities drawn with ``seed`` (quick runs)."""
        ids = self.train_ids
        if n is None or n >= len(ids):
            return self
        if n < 2:
            raise ValueError(f"limit_ids must be at least 2, got {n}")
        keep = set(random.Random(seed).sample(ids, n))
        return dataclasses.replace(self, train=[s for s in self.train if s.pid in keep])


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name (non-image files such as Thumbs.db are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def parse_course_name(path: Path) -> tuple[int, int]:
    """``0002_c1_016620005.jpg`` -> (pid 2, camera 1)."""
    match = COURSE_NAME.match(path.stem)
    if not match:
        raise DataError(f"{path}: file name does not match PID_cCAM_NUMBER.jpg")
    return int(match[1]), int(match[2])


def parse_original_name(path: Path) -> tuple[int, int]:
    """``0002_c1s1_000451_03.jpg`` -> (pid 2, camera 1); ``-1_c3s2_...`` -> (-1, 3)."""
    match = ORIGINAL_NAME.match(path.stem)
    if not match:
        raise DataError(f"{path}: file name does not match PID_cCsS_FRAME_BB.jpg")
    return int(match[1]), int(match[2])


def fingerprint(root: Path, files: Iterable[Path], annotation: Path | None = None) -> str:
    """sha256 over sorted relative names and sizes of ``files`` plus the annotation file's bytes."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    if annotation is not None:
        digest.update(annotation.read_bytes())
    return digest.hexdigest()


def read_annotations_csv(path: Path) -> dict[int, Labels]:
    """``annotations_train.csv`` -> {pid: labels}; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing columns {', '.join(missing)}")
        labels: dict[int, Labels] = {}
        for line, row in enumerate(reader, start=2):
            try:
                labels[int(row["id"])] = labels_from_row(row)
            except (AnnotationError, ValueError) as exc:
                raise DataError(f"{path}, line {line}: {exc}") from None
    return labels


def _check_annotated(samples: list[Sample], attributes: dict[int, Labels], source: Path) -> None:
    for sample in samples:
        if sample.pid not in attributes:
            raise DataError(f"{sample.path}: identity {sample.pid} has no annotation in {source}")


def load_course(root: str | Path) -> MarketData:
    """The course layout: ``train/`` + ``annotations_train.csv``."""
    root = Path(root)
    annotation = root / "annotations_train.csv"
    attributes = read_annotations_csv(annotation)
    files = list_images(root / "train")
    train = [Sample(p, *parse_course_name(p)) for p in files]
    _check_annotated(train, attributes, annotation)
    return MarketData(
        root, "course", train, attributes=attributes, fingerprint=fingerprint(root, files, annotation)
    )


def read_market_attribute_mat(path: Path) -> dict[int, Labels]:
    """``market_attribute.mat`` (struct with ``train`` and ``test``) -> {pid: labels} for both parts."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # scipy is only needed for this layout
        raise DataError(f"{path}: reading .mat files needs scipy (pip install scipy)") from exc
    if not path.is_file():
        raise DataError(f"{path}: attribute file not found")
    try:
        root = loadmat(str(path), squeeze_me=True, struct_as_record=False)["market_attribute"]
    except Exception as exc:
        raise DataError(
            f"{path}: not a readable market_attribute.mat ({type(exc).__name__}: {exc})"
        ) from None
    labels: dict[int, Labels] = {}
    for part in ("train", "test"):
        struct = getattr(root, part, None)
        if struct is None:
            raise DataError(f"{path}: no {part!r} part in market_attribute")
        try:
            index = [str(x).strip() for x in _as_list(struct.image_index)]
            columns = {c: _as_list(getattr(struct, c)) for c in CSV_COLUMNS[1:]}
        except AttributeError as exc:
            raise DataError(f"{path}: {part}: missing field ({exc})") from None
        for i, pid in enumerate(index):
            row = {c: int(values[i]) for c, values in columns.items()}
            try:
                labels[int(pid)] = labels_from_row(row)
            except (AnnotationError, ValueError) as exc:
                raise DataError(f"{path}: {part} identity {pid}: {exc}") from None
    return labels


def _as_list(value: object) -> list[object]:
    import numpy as np

    return list(np.asarray(value, dtype=object).reshape(-1))


def load_original(root: str | Path) -> MarketData:
    """The original layout: bounding_box_train/test, query, market_attribute.mat."""
    root = Path(root)
    annotation = root / "market_attribute.mat"
    attributes = read_market_attribute_mat(annotation)
    parts = {name: list_images(root / name) for name in ("bounding_box_train", "query", "bounding_box_test")}
    train = [Sample(p, *parse_original_name(p)) for p in parts["bounding_box_train"]]
    for sample in train:
        if sample.pid <= 0:
            raise DataError(f"{sample.path}: junk or distractor image in bounding_box_train")
    _check_annotated(train, attributes, annotation)
    query = [Sample(p, *parse_original_name(p)) for p in parts["query"]]
    gallery = [Sample(p, *parse_original_name(p)) for p in parts["bounding_box_test"]]
    files = [p for paths in parts.values() for p in paths]
    return MarketData(
        root, "original", train, query, gallery, attributes, fingerprint(root, files, annotation)
    )


LAYOUTS: dict[str, Callable[[str | Path], MarketData]] = {
    "course": load_course,
    "original": load_original,
}


def detect_layout(root: str | Path) -> str:
    """``course`` when ``train/`` is there, ``original`` when ``bounding_box_train/`` is."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (set --data-root or REID_DATA_ROOT)")
    if (root / "bounding_box_train").is_dir():
        return "original"
    if (root / "train").is_dir():
        return "course"
    raise DataError(
        f"{root}: neither the course layout (train/, annotations_train.csv) nor the original "
        "Market-1501 layout (bounding_box_train/, market_attribute.mat)"
    )


def load_market(root: str | Path, layout: str = "auto") -> MarketData:
    """Read a dataset in the named layout, or detect it."""
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise KeyError(f"unknown layout {layout!r}; available: auto, {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[layout](root)
