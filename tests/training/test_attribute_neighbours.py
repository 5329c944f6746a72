"""Attributes averaged over re-ID neighbours: the neighbour search, the averaging, its validation, and the
commands that measure, record and apply it (evaluate-neighbours, predict-attributes --neighbours-from)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from app.attribute_schema import ATTRIBUTE_GROUPS
from app.bundle import read_manifest, write_manifest
from tests.service.helpers import make_attribute_bundle, make_reid_bundle
from training.attribute_neighbours import impostor_similarity, measure, nearest_neighbours, smoothed_log_probs
from training.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_nearest_neighbours_exclude_the_crop_itself_and_sort_by_similarity():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0]], dtype=np.float32)  # row 4 = row 0
    idx, sims = nearest_neighbours(x * 3.0, 2)  # not normalised on input
    for row in range(len(x)):
        assert row not in idx[row]
    assert set(idx[0]) == {4, 1} and idx[0][0] == 4 and sims[0][0] == pytest.approx(1.0)
    assert list(idx[2]) == [3, 1] and np.all(np.diff(sims, axis=1) <= 1e-6)
    few, few_sims = nearest_neighbours(x[:2], 3)  # fewer rows than k + 1: padded with -1 / 0
    assert list(few[0]) == [1, -1, -1] and few_sims[0][1:].tolist() == [0.0, 0.0]


def test_neighbours_outvote_a_wrong_crop_but_not_a_dissimilar_one():
    # Crop 0 alone says class 0; its three close neighbours say class 1; crop 4 is orthogonal to all.
    logits = {"gender": np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])}
    idx = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, -1]])
    sims = np.array([[0.9] * 3, [0.9] * 3, [0.9] * 3, [0.9] * 3, [-0.2, 0.0, 0.0]])
    out = smoothed_log_probs(logits, idx, sims)["gender"]
    assert out.argmax(1).tolist() == [1, 1, 1, 1, 0]
    assert np.exp(out).sum(1) == pytest.approx(np.ones(5), abs=1e-5)  # log-probabilities
    # Crop 4's neighbours have no positive similarity: its own probabilities, unchanged.
    assert np.exp(out[4]) == pytest.approx([math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)], abs=1e-5)
    sharp = smoothed_log_probs(logits, idx, sims, alpha=40.0)["gender"]  # weights 0.9**40
    assert sharp.argmax(1)[0] == 0  # crop 0 keeps its own
    flat = smoothed_log_probs(logits, idx, sims, alpha=0.0)["gender"]  # weight 1 for positive ones only
    assert np.exp(flat[4]) == pytest.approx(np.exp(out[4]), abs=1e-6)


def test_similarity_floor_drops_neighbours_below_it():
    logits = {"hat": np.array([[1.0, 0.0], [0.0, 3.0], [0.0, 3.0]])}
    idx, sims = np.array([[1, 2]] * 3), np.array([[0.6, 0.4]] * 3)
    assert smoothed_log_probs(logits, idx, sims)["hat"].argmax(1)[0] == 1
    kept = smoothed_log_probs(logits, idx, sims, min_similarity=0.5)["hat"]
    alone = smoothed_log_probs(logits, idx, sims, min_similarity=0.7)["hat"]
    assert np.exp(alone[0]) == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], abs=1e-6)
    assert (
        0
        < np.exp(kept[0][1]) - np.exp(alone[0][1])
        < np.exp(smoothed_log_probs(logits, idx, sims)["hat"][0][1])
    )


def test_impostor_similarity_is_the_quantile_of_every_pair():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 8)), rng.normal(size=(101, 8))
    sims = np.sort(
        (
            (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        ).ravel()
    )
    for rate in (0.01, 5e-4, 0.3):
        expected = sims[-int(np.ceil(rate * sims.size))]
        assert impostor_similarity(a, b, rate, chunk=5) == pytest.approx(expected, abs=1e-6)


def _identities(n_ids: int, per_id: int, seed: int):
    """Clustered embeddings, per-identity labels, and noisy per-crop logits that often get them wrong."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, 32))
    pids = np.repeat(np.arange(n_ids), per_id)
    embeddings = centres[pids] + 0.3 * rng.normal(size=(len(pids), 32))
    labels = np.stack([rng.integers(0, g.num_classes, n_ids)[pids] for g in ATTRIBUTE_GROUPS], 1)
    logits = {
        g.name: 2.0 * np.eye(g.num_classes)[labels[:, j]] + 1.5 * rng.normal(size=(len(pids), g.num_classes))
        for j, g in enumerate(ATTRIBUTE_GROUPS)
    }
    return embeddings, labels, pids, logits


def test_measure_shows_neighbours_correcting_noisy_crops():
    embeddings, labels, pids, logits = _identities(30, 6, seed=0)
    noise, _, _, noise_logits = _identities(40, 5, seed=1)  # distractors: other people, no labels
    pool = np.concatenate([embeddings, noise])
    scores = {name: np.concatenate([logits[name], noise_logits[name]]) for name in logits}
    priors = {g.name: [math.log(1 / g.num_classes)] * g.num_classes for g in ATTRIBUTE_GROUPS}
    tracks = pids * 10 + np.tile(np.arange(6) // 3, 30)  # two tracks of 3 crops per identity
    result = measure(scores, pool, labels, pids, priors, neighbours=5, tracks=tracks)
    assert (result["labelled"], result["crops"]) == (180, 380)
    assert result["min_similarity"] == pytest.approx(impostor_similarity(embeddings, noise), abs=1e-6)
    plain, smoothed = result["plain"], result["smoothed"]
    assert smoothed["as_is"]["mean_accuracy"] > plain["as_is"]["mean_accuracy"] + 0.1
    assert smoothed["per_group_two_fold"]["mA"] > plain["per_group_two_fold"]["mA"] + 0.1
    assert set(smoothed["taus"]) == {g.name for g in ATTRIBUTE_GROUPS}
    assert result["track"]["as_is"]["mean_accuracy"] > plain["as_is"]["mean_accuracy"] + 0.05


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("neighbour-bundles")
    return make_attribute_bundle(tmp / "attributes"), make_reid_bundle(tmp / "reid")


@pytest.fixture(scope="module")
def folder(course_root, tmp_path_factory):
    images = tmp_path_factory.mktemp("neighbour-images")
    for path in sorted((course_root / "train").glob("*.jpg"))[:12]:
        shutil.copy(path, images / path.name)
    return images


def test_predict_with_neighbours_applies_the_recorded_rule(bundles, folder, tmp_path):
    attributes, reid = bundles
    out = tmp_path / "pred.csv"
    args = ("predict-attributes", "--bundle", attributes, "--images", folder, "--out", out, "--no-progress")
    result = invoke(*args, "--neighbours-from", reid, "--neighbours", "2")
    assert result.exit_code == 0, result.output
    assert "2 neighbours" in result.output and "no recorded rule" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == sorted(p.name for p in folder.glob("*.jpg"))
    # A floor no neighbour passes: every crop answers alone, as without neighbours.
    assert invoke(*args).exit_code == 0
    alone = out.read_text()
    floor = invoke(*args, "--neighbours-from", reid, "--min-similarity", "1.01")
    assert floor.exit_code == 0 and "above similarity 1.010" in floor.output and out.read_text() == alone
    # A recorded rule whose gender tau overwhelms any score, towards the class the first crop did not get.
    target = 1 if rows[0]["gender"] == "2" else 2
    bundle = tmp_path / "ruled"
    shutil.copytree(attributes, bundle)
    priors = {g.name: [0.0] * g.num_classes for g in ATTRIBUTE_GROUPS}
    priors["gender"][target - 1] = -1000.0
    manifest = read_manifest(bundle)
    spec = {
        "neighbours": 2,
        "alpha": 1.0,
        "reid_bundle": "r 1",
        "taus": {"gender": 1.0},
        "log_priors": priors,
    }
    write_manifest(bundle, manifest.model_validate({**manifest.model_dump(), "neighbour_smoothing": spec}))
    result = invoke(*args[:2], bundle, *args[3:], "--neighbours-from", reid)
    assert result.exit_code == 0, result.output
    assert "2 neighbours" in result.output and "taus re-chosen with r 1" in result.output
    assert {r["gender"] for r in csv.DictReader(out.open())} == {str(target)}
    wrong = invoke(*args, "--neighbours-from", attributes)
    assert wrong.exit_code == 1 and "needs 'reid'" in wrong.output


def test_evaluate_neighbours_measures_and_records(bundles, course_root, folder, tmp_path):
    attributes, reid = bundles
    attributes = shutil.copytree(attributes, tmp_path / "attributes")
    shipped = shutil.copytree(attributes, tmp_path / "shipped")
    older = read_manifest(shipped)  # written before an option existed: its default left out
    architecture = {k: v for k, v in older.architecture.items() if k != "max_pool"}
    write_manifest(shipped, older.model_copy(update={"architecture": architecture}))
    split = tmp_path / "split.json"
    assert invoke("split", "--data-root", course_root, "--out", split).exit_code == 0
    common = [
        "--reid-bundle", reid, "--distractors", folder, "--split-file", split, "--data-root", course_root,
        "--cache-dir", tmp_path / "cache", "--neighbours", "4", "--no-progress",
    ]  # fmt: skip
    result = invoke("evaluate-neighbours", attributes, *common, "--record", "--record-into", shipped)
    assert result.exit_code == 0, result.output
    assert "smoothed per_group_two_fold" in result.output and "track    as_is" in result.output
    saved = json.loads((attributes / "neighbours_metrics.json").read_text())
    assert saved["crops"] == saved["labelled"] + 12 and saved["neighbours"] == 4
    for bundle, taus in ((attributes, saved["smoothed"]["taus"]), (shipped, {})):
        spec = read_manifest(bundle).neighbour_smoothing
        assert spec is not None and spec.neighbours == 4 and spec.taus == taus
        assert spec.min_similarity == saved["min_similarity"]
        assert spec.metrics["smoothed/as_is"]["mA"] == saved["smoothed"]["as_is"]["mA"]
    assert read_manifest(attributes).version == read_manifest(shipped).version  # weights untouched

    trained_all = tmp_path / "all"
    shutil.copytree(attributes, trained_all)
    manifest = read_manifest(trained_all)
    write_manifest(trained_all, manifest.model_copy(update={"training_config": {"train_all": True}}))
    refused = invoke("evaluate-neighbours", trained_all, *common)
    assert refused.exit_code == 1 and "--record-into" in refused.output
    swapped = invoke("evaluate-neighbours", reid, *common)
    assert swapped.exit_code == 1 and "not an attribute bundle" in swapped.output
    other = invoke("evaluate-neighbours", attributes, *common, "--record-into", reid)
    assert other.exit_code == 1 and "--record-into" in other.output
    no_split = invoke("evaluate-neighbours", attributes, *common, "--split-file", tmp_path / "no.json")
    assert no_split.exit_code == 1 and "no such file" in no_split.output
