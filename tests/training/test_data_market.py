"""Both Market-1501 layouts: parsing, attributes, errors that name the file, the fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.attribute_schema import ATTRIBUTE_GROUPS
from tests.synthetic import make_course_dataset
from training.data.market import (
    DataError,
    detect_layout,
    load_market,
    parse_course_name,
    parse_original_name,
)


def test_course_layout(course_root):
    data = load_market(course_root)
    assert data.layout == "course"
    assert len(data.train) == 12 * 6 and len(data.train_ids) == 12
    assert data.query == [] and data.gallery == []
    first = data.train[0]
    assert (first.pid, first.camid) == (1, 1) and first.path.name == "0001_c1_000000000.jpg"
    assert set(data.attributes) == set(data.train_ids)
    assert set(data.attributes[1]) == {g.name for g in ATTRIBUTE_GROUPS}
    assert len(data.fingerprint) == 64


def test_course_labels_match_generator(tmp_path):
    people = make_course_dataset(tmp_path, n_ids=5, images_per_id=2)
    data = load_market(tmp_path, "course")
    for person in people:
        assert data.attributes[person.pid] == person.labels


def test_original_layout(original_root):
    data = load_market(original_root)
    assert data.layout == "original"
    assert len(data.train) == 8 * 6 and len(data.train_ids) == 8
    assert {s.pid for s in data.gallery} >= {-1, 0}
    assert all(s.pid > 0 for s in data.query)
    assert len(data.query) + len(data.gallery) == 6 * 6 + 2
    # attributes of both the train and the test identities come from the .mat file
    assert set(data.train_ids) | {s.pid for s in data.query} <= set(data.attributes)


def test_name_parsers():
    assert parse_course_name(Path("0002_c1_016620005.jpg")) == (2, 1)
    assert parse_original_name(Path("0002_c1s1_000451_03.jpg")) == (2, 1)
    assert parse_original_name(Path("-1_c3s2_000100_00.jpg")) == (-1, 3)
    assert parse_original_name(Path("0000_c6s1_000002_00.jpg")) == (0, 6)
    with pytest.raises(DataError, match=r"bad\.jpg"):
        parse_course_name(Path("bad.jpg"))
    with pytest.raises(DataError, match=r"0002_c1_0001\.jpg"):
        parse_original_name(Path("0002_c1_0001.jpg"))


def copy(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(root, out)
    return out


def test_malformed_name_names_the_file(course_root, tmp_path):
    root = copy(course_root, tmp_path)
    (root / "train" / "person7.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"person7\.jpg"):
        load_market(root)


def test_missing_annotation_names_the_file(course_root, tmp_path):
    root = copy(course_root, tmp_path)
    shutil.copy(root / "train" / "0001_c1_000000000.jpg", root / "train" / "0999_c1_000000001.jpg")
    with pytest.raises(DataError, match=r"0999_c1_000000001\.jpg.*999"):
        load_market(root)


def test_bad_annotation_row_names_file_and_line(course_root, tmp_path):
    root = copy(course_root, tmp_path)
    csv = root / "annotations_train.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace(",1,", ",7,", 1)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"annotations_train\.csv, line 3"):
        load_market(root)


def test_non_images_are_skipped(course_root, tmp_path):
    root = copy(course_root, tmp_path)
    (root / "train" / "Thumbs.db").write_bytes(b"x")
    assert len(load_market(root).train) == 72


def test_detect_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        detect_layout(tmp_path / "nowhere")
    with pytest.raises(DataError, match="neither"):
        detect_layout(tmp_path)


def test_fingerprint_changes_with_data(course_root, tmp_path):
    root = copy(course_root, tmp_path)
    before = load_market(root).fingerprint
    assert load_market(root).fingerprint == before
    victim = root / "train" / "0001_c1_000000000.jpg"
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert load_market(root).fingerprint != before


def test_limit_train_ids(course_root):
    data = load_market(course_root)
    small = data.limit_train_ids(4, seed=1)
    assert len(small.train_ids) == 4 and small.train_ids == data.limit_train_ids(4, seed=1).train_ids
    assert data.limit_train_ids(None) is data


@pytest.mark.shared_data
def test_real_course_data(shared_data_root):
    data = load_market(shared_data_root)
    assert len(data.train) == 12989 and len(data.train_ids) == 751
