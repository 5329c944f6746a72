"""Identity-disjoint, seeded, stratified split; JSON round trip."""

from __future__ import annotations

import pytest

from tests.synthetic import make_identities
from training.data.market import load_market
from training.data.split import Split, coverage_gaps, resolve_split, split_identities


@pytest.fixture
def labels():
    return {p.pid: p.labels for p in make_identities(60, seed=5)}


def test_disjoint_seeded_fraction(labels):
    split = split_identities(labels, 0.2, seed=1)
    assert not set(split.train_ids) & set(split.val_ids)
    assert set(split.train_ids) | set(split.val_ids) == set(labels)
    assert len(split.val_ids) == 12
    assert split_identities(labels, 0.2, seed=1) == split
    assert split_identities(labels, 0.2, seed=2) != split


def test_every_class_on_both_sides(labels):
    for seed in range(5):
        assert coverage_gaps(split_identities(labels, 0.2, seed), labels) == []


def test_rare_class_kept_on_both_sides():
    labels = {p.pid: p.labels for p in make_identities(30, seed=0)}
    for pid in labels:
        labels[pid]["hat"] = 0
    labels[3]["hat"] = labels[17]["hat"] = 1  # only two identities wear a hat
    split = split_identities(labels, 0.2, seed=0)
    assert {3, 17} & set(split.train_ids) and {3, 17} & set(split.val_ids)


def test_unlabelled_ids(labels):
    plain = {pid: {} for pid in range(1, 51)}
    split = split_identities(plain, 0.2, seed=0)
    assert len(split.val_ids) == 10 and len(split.train_ids) == 40


def test_json_round_trip_and_partition(labels, tmp_path, course_root):
    split = split_identities(labels, 0.25, seed=3, data_fingerprint="abc")
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split
    data = load_market(course_root)
    s = split_identities(data.attributes, 0.25, seed=0)
    train, val = s.partition(data.train)
    assert len(train) + len(val) == len(data.train)
    assert {x.pid for x in val} == set(s.val_ids)


def test_overlap_rejected():
    with pytest.raises(ValueError, match="disjoint"):
        Split([1, 2], [2, 3])


def test_resolve_split_writes_and_reuses(labels, tmp_path):
    file = tmp_path / "shared" / "split.json"
    first = resolve_split(labels, split_file=file, run_dir=tmp_path / "run1", seed=4)
    assert file.is_file() and (tmp_path / "run1" / "split.json").is_file()
    again = resolve_split(labels, split_file=file, run_dir=tmp_path / "run2", seed=99)
    assert again.val_ids == first.val_ids
    subset = {p: labels[p] for p in list(labels)[:30]}
    restricted = resolve_split(subset, split_file=file, run_dir=tmp_path / "run3")
    assert set(restricted.val_ids) <= set(first.val_ids) and set(restricted.train_ids) <= set(subset)
    bigger = {**labels, 999: labels[1]}
    with pytest.raises(ValueError, match="999"):
        resolve_split(bigger, split_file=file, run_dir=tmp_path / "run4")
