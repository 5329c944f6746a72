"""reid-train's re-ID commands end to end on tiny generated data: train, resume, export, evaluate,
predict, ablation."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from app.bundle import read_manifest
from training.cli import app

runner = CliRunner()
TINY = ["--backbone", "osnet_x0_25", "--input-size", "64x32", "--no-progress", "--threads", "1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def reid_run(course_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reid-cli")
    run = tmp / "run"
    result = invoke(
        "train-reid", "--data-root", course_root, "--run-dir", run, "--cache-dir", tmp / "cache",
        "--epochs", "1", "--p", "3", "--k", "2", "--branch-dim", "16", "--monitor", "rank1", "--rerank",
        *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "match threshold" in result.output and "re-ranked" in result.output
    return run


def test_run_directory(reid_run):
    for name in ("config.json", "metrics.json", "best.pt", "last.pt", "split.json", "val_metrics.json"):
        assert (reid_run / name).is_file(), name
    for plot in ("loss", "retrieval", "cmc", "tsne", "ranked_lists"):
        assert (reid_run / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    config = json.loads((reid_run / "config.json").read_text())
    assert config["task"] == "reid" and config["recipe"] == "modern" and config["batch_size"] == 6
    assert (config["monitor"], config["monitor_mode"]) == ("rank1", "max")
    final = json.loads((reid_run / "val_metrics.json").read_text())
    assert {"rank1", "mAP", "mINP", "map80", "match_threshold", "rerank"} <= set(final["validation"])
    assert final["protocol"]["queries"] + final["protocol"]["gallery"] == final["images"]["val"]
    assert "plots/ranked_lists.png" in (reid_run / "report.md").read_text()


def test_resume(reid_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reid_run, run)
    result = invoke("train-reid", "--resume", "--run-dir", run, "--epochs", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2]
    refused = invoke("train-reid", "--resume", "--run-dir", run, "--margin", "1")
    assert refused.exit_code == 1 and "cannot change: margin" in refused.output


def test_export_evaluate_predict(reid_run, course_root, tmp_path):
    result = invoke("export", reid_run, "--store", tmp_path / "store", "--name", "r")
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "store" / "r"
    manifest = read_manifest(bundle)
    assert manifest.embedding.dim == 32 and manifest.architecture["num_classes"] == 0
    saved = json.loads((reid_run / "val_metrics.json").read_text())["validation"]
    assert manifest.match_threshold == pytest.approx(saved["match_threshold"])

    out = tmp_path / "eval"
    result = invoke("evaluate-reid", bundle, "--out", out, "--data-root", course_root, "--no-progress")
    assert result.exit_code == 0, result.output
    evaluated = json.loads((out / "val_metrics.json").read_text())["validation"]
    assert evaluated["mAP"] == pytest.approx(saved["mAP"], abs=1e-4)  # same split, same protocol
    assert (out / "plots" / "cmc.png").is_file()

    result = invoke("evaluate-reid", bundle, "--protocol", "market-test", "--data-root", course_root)
    assert result.exit_code == 1 and "no labelled query/gallery" in result.output

    images = sorted((course_root / "train").iterdir())
    queries, gallery = tmp_path / "q", tmp_path / "g"
    queries.mkdir()
    gallery.mkdir()
    for path in images[:3]:
        shutil.copy(path, queries / path.name)
    for path in images[3:20]:
        shutil.copy(path, gallery / path.name)
    ranking = tmp_path / "ranking.txt"
    result = invoke("predict-reid", "--bundle", bundle, "--queries", queries, "--gallery", gallery,
                    "--out", ranking, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = ranking.read_text().splitlines()
    assert [line.split(": ")[0] for line in lines] == [p.name for p in images[:3]]
    ranked = lines[0].split(": ")[1].split(", ")
    assert sorted(ranked) == sorted(p.name for p in images[3:20])  # the full gallery, each once
    result = invoke("predict-reid", "--bundle", bundle, "--queries", queries, "--gallery", gallery,
                    "--out", ranking, "--top", "5", "--no-progress")  # fmt: skip
    top = ranking.read_text().splitlines()[0].split(": ")[1].split(", ")
    assert result.exit_code == 0 and top == ranked[:5]
    result = invoke("predict-reid", "--bundle", bundle, "--queries", queries, "--gallery", gallery,
                    "--out", ranking, "--rerank", "--flip", "--no-progress")  # fmt: skip
    assert result.exit_code == 0 and "re-ranked 3 x 17" in result.output, result.output
    reranked = [line.split(": ")[1].split(", ") for line in ranking.read_text().splitlines()]
    assert all(sorted(r) == sorted(p.name for p in images[3:20]) for r in reranked)


def test_train_all_bundle_borrows_metrics_and_estimates_thresholds(reid_run, course_root, tmp_path):
    from tests.synthetic import make_course_dataset

    run = tmp_path / "all"
    result = invoke(
        "train-reid", "--data-root", course_root, "--run-dir", run, "--cache-dir", tmp_path / "cache",
        "--epochs", "1", "--p", "3", "--k", "2", "--branch-dim", "16", "--train-all", "--ema-decay", "0.99",
        "--lr-steps", "1", *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["ema_decay"] == 0.99 and saved["lr_steps"] == [1]  # exported below as kept
    assert (
        "train images of 12 identities" in result.output
        and "trained on (--train-all)" in (run / "report.md").read_text()
    )
    store = tmp_path / "store"
    refused = invoke("export", run, "--store", store, "--name", "all")
    assert refused.exit_code == 1 and "--metrics-from" in refused.output
    assert invoke("export", reid_run, "--store", store, "--name", "split").exit_code == 0
    result = invoke("export", run, "--store", store, "--name", "all", "--metrics-from", store / "split")
    assert result.exit_code == 0, result.output
    split, every = read_manifest(store / "split"), read_manifest(store / "all")
    assert every.metrics["mAP"] == split.metrics["mAP"] and every.metrics["identities"] == 12
    assert every.match_threshold == split.match_threshold and "every identity" in every.metrics["trained_on"]
    from app.retrieval import QE_ALPHA, QE_NEIGHBOURS

    assert (split.query_expansion.neighbours, split.query_expansion.alpha) == (QE_NEIGHBOURS, QE_ALPHA)
    gs = split.query_expansion.gallery_side  # recorded with its own threshold, and its metrics
    assert gs is not None and gs.match_threshold != split.query_expansion.match_threshold
    assert "mAP_gallery_side" in split.query_expansion.metrics["validation"]

    args = [
        "evaluate-reid",
        store / "all",
        "--data-root",
        course_root,
        "--out",
        tmp_path / "ev",
        "--no-progress",
    ]
    refused = invoke(*args, "--record")
    assert refused.exit_code == 1 and "needs --distractors" in refused.output
    make_course_dataset(tmp_path / "other", n_ids=6, images_per_id=4, seed=9)
    result = invoke(*args, "--record", "--distractors", tmp_path / "other" / "train")
    assert result.exit_code == 0, result.output
    assert "estimated on the 24 distractor crops" in result.output
    recorded = json.loads((tmp_path / "ev" / "validation_distractors_metrics.json").read_text())
    estimate = recorded["validation_distractors"]["unlabelled_threshold"]
    again = read_manifest(store / "all")
    assert again.match_threshold == pytest.approx(estimate["match_threshold"])
    assert again.query_expansion.match_threshold == pytest.approx(estimate["match_threshold_expanded"])
    gallery_side = again.query_expansion.gallery_side
    assert gallery_side.match_threshold == pytest.approx(estimate["match_threshold_gallery_side"])
    assert again.metrics["mAP"] == split.metrics["mAP"]  # seen identities never overwrite the split's
    assert "unlabelled crops" in again.metrics["match_threshold_source"]
    # a gallery-side path borrowed from an older evaluation gets no thresholds estimated for another
    manifest_file = store / "all" / "manifest.json"
    stale = json.loads(manifest_file.read_text())
    stale["query_expansion"]["gallery_side"]["order"] = "expand_first"
    manifest_file.write_text(json.dumps(stale))
    refused = invoke(*args, "--record", "--distractors", tmp_path / "other" / "train")
    assert refused.exit_code == 1 and "export this run again with --metrics-from" in refused.output


def test_flip_bundle_command(reid_run, tmp_path):
    store = tmp_path / "store"
    assert invoke("export", reid_run, "--store", store, "--name", "split").exit_code == 0
    result = invoke("flip-bundle", store / "split", "--name", "split-flip", "--store", store)
    assert result.exit_code == 0 and "with test-time flip, version" in result.output, result.output
    assert read_manifest(store / "split-flip").architecture["flip_average"]
    again = invoke("flip-bundle", store / "split-flip", "--name", "twice", "--store", store)
    assert again.exit_code == 1 and "already embeds with test-time flip" in again.output


def test_ablation_table(course_root, tmp_path):
    result = invoke(
        "ablation", "--data-root", course_root, "--out", tmp_path / "abl", "--epochs", "1",
        "--limit-ids", "10", "--cache-dir", tmp_path / "cache", *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "a subset of 10 identities" in table and "at most 1 epochs" in table
    assert "ours: no ID loss" in table and "ours: with ID loss" in table
    no_id = json.loads((tmp_path / "abl" / "no_id_loss" / "config.json").read_text())
    assert no_id["id_loss"] is False and no_id["recipe"] == "report"
    split = json.loads((tmp_path / "abl" / "split.json").read_text())
    assert json.loads((tmp_path / "abl" / "with_id_loss" / "split.json").read_text()) == split


def test_errors(tmp_path):
    result = invoke("train-reid", "--data-root", tmp_path / "missing", "--run-dir", tmp_path / "r")
    assert result.exit_code == 1 and "not found" in result.output
    result = invoke("train-reid", "--recipe", "nope", "--data-root", tmp_path, "--run-dir", tmp_path / "r")
    assert result.exit_code == 1 and "available" in result.output


def test_market_test_protocol(reid_run, original_root, tmp_path):
    out = tmp_path / "test-eval"
    result = invoke(
        "evaluate-reid", reid_run, "--protocol", "market-test", "--data-root", original_root,
        "--out", out, "--cache-dir", tmp_path / "cache", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "market_test_metrics.json").read_text())
    assert saved["protocol"]["queries"] == 6 * 3  # 6 test identities, one query per camera
    assert saved["protocol"]["gallery"] == 6 * 3 + 2  # plus one junk and one distractor image
    assert 0 <= saved["market_test"]["mAP"] <= 1


def test_distractors_count_as_wrong_matches(reid_run, course_root, tmp_path):
    """--distractors adds crops of 'other people' (pid 0) to the validation gallery. Here they are exact
    copies of every validation image: each query's copy ranks first and must count as a wrong match."""
    val_ids = set(json.loads((reid_run / "split.json").read_text())["val_ids"])
    folder = tmp_path / "distractors"
    folder.mkdir()
    copies = [p for p in sorted((course_root / "train").iterdir()) if int(p.name.split("_")[0]) in val_ids]
    for i, path in enumerate(copies):
        shutil.copy(path, folder / f"{i:06d}.jpg")  # course test/ names: no identity, no camera
    out = tmp_path / "eval"
    result = invoke("evaluate-reid", reid_run, "--out", out, "--data-root", course_root,
                    "--distractors", folder, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "validation_distractors:" in result.output
    plain = json.loads((out / "val_metrics.json").read_text())
    hard = json.loads((out / "validation_distractors_metrics.json").read_text())
    assert hard["protocol"]["distractors"] == len(copies)
    assert hard["protocol"]["gallery"] == plain["protocol"]["gallery"] + len(copies)
    assert hard["validation_distractors"]["num_queries"] == plain["validation"]["num_queries"]
    assert hard["validation_distractors"]["rank1"] == 0.0 < plain["validation"]["rank1"]
    assert hard["validation_distractors"]["mAP"] < plain["validation"]["mAP"]
    assert (out / "plots_distractors" / "cmc.png").is_file()
