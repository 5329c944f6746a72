"""reid-train: train-attributes, resume, split, data-stats, export, predict-attributes."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from app.attribute_schema import CSV_COLUMNS
from training.cli import app

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_train_run_directory(attribute_run):
    for name in (
        "config.json",
        "metrics.json",
        "best.pt",
        "last.pt",
        "split.json",
        "val_metrics.json",
        "report.md",
    ):
        assert (attribute_run / name).is_file(), name
    for plot in ("class_balance", "loss", "accuracy", "confusion_age", "confusion_upper_colour"):
        assert (attribute_run / "plots" / f"{plot}.png").stat().st_size > 1000
    report = (attribute_run / "report.md").read_text()
    assert "plots/class_balance.png" in report and "majority" in report
    history = json.loads((attribute_run / "metrics.json").read_text())
    assert len(history) == 2


def test_monitor_picks_the_best_epoch_by_that_metric(attribute_run):
    config = json.loads((attribute_run / "config.json").read_text())
    assert (config["monitor"], config["monitor_mode"]) == ("mA", "max")
    history = json.loads((attribute_run / "metrics.json").read_text())
    best = torch.load(attribute_run / "best.pt", map_location="cpu", weights_only=False)
    assert best["metrics"]["mA"] == max(record["mA"] for record in history)


def test_resume_continues_and_refuses_changes(attribute_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attribute_run, run)
    result = invoke(
        "train-attributes", "--resume", "--run-dir", run, "--epochs", "3", "--no-amp", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert len((run / "commands.txt").read_text().splitlines()) == 2  # the start, then this resume
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 3 and (saved["amp"], saved["precision"]) == (False, "fp32")  # may change
    refused = invoke("train-attributes", "--resume", "--run-dir", run, "--lr", "0.1")
    assert refused.exit_code == 1 and "cannot change: lr" in refused.output


def test_existing_run_is_not_overwritten(attribute_run, course_root):
    result = invoke(
        "train-attributes", "--data-root", course_root, "--run-dir", attribute_run, "--epochs", "1"
    )
    assert result.exit_code == 1 and "--resume" in result.output


def test_clear_errors(tmp_path):
    missing = invoke("train-attributes", env={"REID_DATA_ROOT": ""})
    assert missing.exit_code == 1 and "REID_DATA_ROOT" in missing.output
    nowhere = invoke("train-attributes", "--data-root", tmp_path / "nowhere", "--run-dir", tmp_path / "r")
    assert nowhere.exit_code == 1 and "not found" in nowhere.output
    bad = invoke("train-attributes", "--data-root", tmp_path, "--init-weights", tmp_path / "x.pth")
    assert bad.exit_code == 1 and "x.pth" in bad.output
    size = invoke("train-attributes", "--data-root", tmp_path, "--input-size", "256by128")
    assert size.exit_code != 0 and "HEIGHTxWIDTH" in size.output
    steps = invoke("train-attributes", "--data-root", tmp_path, "--lr-steps", "8,twelve")
    assert steps.exit_code != 0 and "8,12" in steps.output
    folder = invoke("train-attributes", "--data-root", tmp_path, "--init-weights", tmp_path)
    assert folder.exit_code == 1 and "re-ID bundle folder" in folder.output


def test_split_and_data_stats(course_root, tmp_path):
    result = invoke("split", "--out", tmp_path / "split.json", env={"REID_DATA_ROOT": str(course_root)})
    assert result.exit_code == 0, result.output
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["train_ids"]) + len(split["val_ids"]) == 12
    stats = invoke("data-stats", "--data-root", course_root, "--out", tmp_path / "stats")
    assert stats.exit_code == 0, stats.output
    counts = json.loads((tmp_path / "stats" / "class_counts.json").read_text())
    assert sum(counts["gender"]) == 12 and (tmp_path / "stats" / "class_balance.png").is_file()


def test_export_and_predict(attribute_run, course_root, tmp_path):
    result = invoke("export", attribute_run, "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "store" / "attributes"
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (course_root / "train").glob("*.jpg"))[:10]
    for name in names:
        shutil.copy(course_root / "train" / name, images / name)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    result = invoke(
        "predict-attributes", "--bundle", bundle, "--images", images, "--out", out, "--batch-size", "4"
    )
    assert result.exit_code == 0, result.output
    with out.open() as fh:
        header = fh.readline().strip()
    assert header == ",".join(CSV_COLUMNS)
    assert header == (course_root / "annotations_train.csv").read_text().splitlines()[0]
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == names
    for row in rows:
        assert 1 <= int(row["age"]) <= 4 and row["gender"] in ("1", "2")
        assert sum(row[c] == "2" for c in CSV_COLUMNS if c.startswith("up") and c != "up") <= 1


def test_export_with_logit_adjustment(attribute_run, tmp_path):
    """The bundle's argmax equals plain logits minus tau * log prior, and it records that tau's metrics."""
    from app.nets.bundles import load_bundle

    saved = json.loads((attribute_run / "val_metrics.json").read_text())["logit_adjustment"]
    assert [r["tau"] for r in saved["tradeoff"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (attribute_run / "plots" / "logit_adjustment.png").is_file()
    for tau in ("0", "0.5"):
        result = invoke("export", attribute_run, "--store", tmp_path / tau, "--logit-adjust", tau)
        assert result.exit_code == 0, result.output
    (plain_manifest, plain), (manifest, adjusted) = (
        load_bundle(tmp_path / t / "attributes") for t in ("0", "0.5")
    )
    row = next(r for r in saved["tradeoff"] if r["tau"] == 0.5)
    assert manifest.metrics["logit_adjust"] == 0.5 and manifest.metrics["mA"] == row["mA"]
    assert "logit_adjust" not in plain_manifest.metrics
    x = torch.randint(0, 256, (6, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        before, after = plain(x), adjusted(x)
    for name, log_prior in saved["log_priors"].items():
        torch.testing.assert_close(after[name], before[name] - 0.5 * torch.tensor(log_prior))
    unmeasured = invoke("export", attribute_run, "--store", tmp_path / "x", "--logit-adjust", "0.3")
    assert unmeasured.exit_code == 1 and "0.25" in unmeasured.output


def _plain_and_adjusted(run, tmp_path, *args):
    """``run`` exported with ``args``, and the logits of its best.pt and of that bundle on one batch."""
    from app.nets.bundles import build_network, load_bundle
    from training.engine import load_checkpoint

    result = invoke("export", run, "--store", tmp_path / "adjusted", *args)
    assert result.exit_code == 0, result.output
    manifest, adjusted = load_bundle(tmp_path / "adjusted" / "attributes")
    best = load_checkpoint(run / "best.pt")
    plain = build_network("attributes", best["architecture"])
    plain.load_state_dict(best["model"])
    x = torch.randint(0, 256, (6, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        return manifest, plain.eval()(x), adjusted(x)


def test_export_with_per_group_logit_adjustment(attribute_run, tmp_path):
    """--logit-adjust per-group folds each group's own tau (chosen on validation) and records it."""
    saved = json.loads((attribute_run / "val_metrics.json").read_text())["logit_adjustment"]
    taus = saved["per_group"]["taus"]
    assert set(taus) == set(saved["log_priors"]) and set(taus.values()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    manifest, before, after = _plain_and_adjusted(attribute_run, tmp_path, "--logit-adjust", "per-group")
    assert manifest.metrics["logit_adjust"] == taus
    assert manifest.metrics["mA"] == saved["per_group"]["mA"]
    for name, log_prior in saved["log_priors"].items():
        torch.testing.assert_close(after[name], before[name] - taus[name] * torch.tensor(log_prior))
    bad = invoke("export", attribute_run, "--store", tmp_path / "x", "--logit-adjust", "lots")
    assert bad.exit_code == 1 and "per-group" in bad.output


def test_train_all_exports_with_the_split_runs_rule(attribute_run, course_root, tmp_path):
    """A --train-all run is exported with --metrics-from the split run's bundle: the manifest carries
    that bundle's validation and decision rule, applied with the new run's own class priors."""
    split_bundle = tmp_path / "split"
    result = invoke("export", attribute_run, "--store", split_bundle, "--logit-adjust", "per-group")
    assert result.exit_code == 0, result.output
    run = tmp_path / "all"
    args = [
        "train-attributes", "--data-root", course_root, "--backbone", "osnet_x0_25", "--input-size", "64x32",
        "--epochs", "1", "--batch-size", "16", "--run-dir", run, "--cache-dir", tmp_path / "cache",
        "--device", "cpu", "--no-progress", "--train-all",
    ]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["monitor"] == "epoch"
    from app.bundle import NeighbourSmoothingSpec, read_manifest, write_manifest

    source = read_manifest(split_bundle / "attributes")
    rule = NeighbourSmoothingSpec(neighbours=7, alpha=1.0, reid_bundle="reid-split 1", taus={"hat": 0.5})
    source = source.model_copy(update={"neighbour_smoothing": rule})
    write_manifest(split_bundle / "attributes", source)  # as evaluate-neighbours --record leaves it
    manifest, before, after = _plain_and_adjusted(
        run, tmp_path, "--metrics-from", split_bundle / "attributes"
    )
    assert (
        manifest.metrics["mA"] == source.metrics["mA"] and source.version in manifest.metrics["metrics_from"]
    )
    assert manifest.neighbour_smoothing == rule  # the neighbour rule goes with the split run's taus
    priors = json.loads((run / "val_metrics.json").read_text())["logit_adjustment"]["log_priors"]
    for name, log_prior in priors.items():
        tau = source.metrics["logit_adjust"][name]
        torch.testing.assert_close(after[name], before[name] - tau * torch.tensor(log_prior))
    seen = invoke("export", run, "--store", tmp_path / "w")
    assert seen.exit_code == 1 and "--metrics-from" in seen.output
    both = invoke("export", run, "--store", tmp_path / "y", "--metrics-from", split_bundle / "attributes",
                  "--logit-adjust", "0.5")  # fmt: skip
    assert both.exit_code == 1 and "cannot be given too" in both.output
    own = invoke(
        "export", attribute_run, "--store", tmp_path / "z", "--metrics-from", split_bundle / "attributes"
    )
    assert own.exit_code == 1 and "--train-all" in own.output


def test_evaluate_attributes_rewrites_the_run_report(attribute_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attribute_run, run)
    before = json.loads((run / "val_metrics.json").read_text())
    (run / "val_metrics.json").unlink()
    (run / "report.md").unlink()
    result = invoke("evaluate-attributes", run)
    assert result.exit_code == 0, result.output
    after = json.loads((run / "val_metrics.json").read_text())
    assert after["validation"]["mA"] == pytest.approx(before["validation"]["mA"])
    assert len(after["logit_adjustment"]["tradeoff"]) == 5 and "tau 0.5" in result.output
    assert "Logit adjustment" in (run / "report.md").read_text()
    missing = invoke("evaluate-attributes", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "nowhere" in missing.output


def test_predict_rejects_a_reid_bundle_and_bad_dirs(attribute_run, tmp_path):
    result = invoke(
        "predict-attributes", "--bundle", tmp_path, "--images", tmp_path, "--out", tmp_path / "x.csv"
    )
    assert result.exit_code == 1 and "manifest" in result.output


@pytest.mark.shared_data
def test_data_stats_on_real_data(shared_data_root, tmp_path):
    result = invoke("data-stats", "--data-root", shared_data_root, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    counts = json.loads((tmp_path / "class_counts.json").read_text())
    assert sum(counts["gender"]) == 751


def test_fuse_conv_bn_keeps_outputs(attribute_run):
    import torch

    from app.nets.bundles import build_network
    from training.batch_inference import fuse_conv_bn
    from training.engine import load_checkpoint

    ckpt = load_checkpoint(attribute_run / "best.pt")
    arch = {**ckpt["architecture"], "backbone": "mobilenet_v2"}
    model = build_network("attributes", arch).eval()
    x = torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        before = model(x)
        assert fuse_conv_bn(model) > 30
        after = model(x)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-4, rtol=1e-4)
