"""Attribute heads: stripe and max pooling (bins, features, CLI -> bundle -> ONNX graph), training options."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from app.bundle import read_manifest
from app.nets.attributes import AttributeNet, AttributeNetConfig
from app.nets.common import stripe_bins
from training.cli import app
from training.export import export_run
from training.onnx_export import check_batch, max_difference


def test_stripe_bins_cover_the_rows_like_adaptive_pooling():
    assert stripe_bins(16, 2) == [(0, 8), (8, 16)]
    assert stripe_bins(16, 3) == [(0, 6), (5, 11), (10, 16)]  # overlapping where rows do not divide
    assert stripe_bins(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="stripes from a map 4 rows tall"):
            stripe_bins(4, bad)


def _map_and_features(**options) -> tuple[AttributeNet, torch.Tensor, torch.Tensor]:
    """A random network's final map and pooled features of two random crops."""
    torch.manual_seed(0)
    net = AttributeNet(AttributeNetConfig(backbone="osnet_x0_25", input_size=(64, 32), **options)).eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        return net, net.last_stage(net.trunk(net.normalize(x))), net.features(x)


def test_features_are_the_global_average_then_each_stripe():
    net, fmap, feat = _map_and_features(stripes=2)
    assert net.feature_dim == 3 * 128
    rows = fmap.shape[2]
    torch.testing.assert_close(feat[:, :128], fmap.mean((2, 3)))
    torch.testing.assert_close(feat[:, 128:256], fmap[:, :, : rows // 2].mean((2, 3)))
    torch.testing.assert_close(feat[:, 256:], fmap[:, :, rows // 2 :].mean((2, 3)))
    assert not torch.allclose(feat[:, 128:256], feat[:, 256:])
    with pytest.raises(ValueError, match="stripes must be >= 0"):
        AttributeNet(AttributeNetConfig(backbone="osnet_x0_25", input_size=(64, 32), stripes=-1))


def test_max_pool_adds_the_global_max_after_the_average():
    net, fmap, feat = _map_and_features(stripes=2, max_pool=True)
    assert net.feature_dim == 4 * 128
    rows = fmap.shape[2]
    torch.testing.assert_close(feat[:, :128], fmap.mean((2, 3)))
    torch.testing.assert_close(feat[:, 128:256], fmap.amax((2, 3)))
    torch.testing.assert_close(feat[:, 384:], fmap[:, :, rows // 2 :].mean((2, 3)))
    assert (feat[:, 128:256] > feat[:, :128]).any()


def _train_args(course_root, tmp_path, *extra: str) -> list[str]:
    return [
        "train-attributes", "--data-root", str(course_root), "--backbone", "osnet_x0_25",
        "--input-size", "64x32", "--epochs", "1", "--batch-size", "16", "--run-dir", str(tmp_path / "run"),
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "pooled", "report"),
    [
        ((), 3, "global average and 2 horizontal stripes"),
        (
            ("--max-pool", "--erase-p", "0", "--label-smoothing", "0.1"),
            4,
            "global average and max and 2 horizontal stripes",
        ),
    ],
)
def test_cli_run_with_stripes_exports_a_bundle_whose_graph_matches(
    course_root, tmp_path, extra, pooled, report
):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, _train_args(course_root, tmp_path, "--stripes", "2", *extra))
    assert result.exit_code == 0, result.output
    assert report in (run_dir / "report.md").read_text()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["erase_p"] == (0.0 if "--erase-p" in extra else 0.5)
    assert config["label_smoothing"] == (0.1 if "--label-smoothing" in extra else 0.0)
    bundle = export_run(run_dir, store=tmp_path / "store", command="test")
    manifest = read_manifest(bundle)
    assert manifest.architecture["stripes"] == 2 and manifest.onnx is not None
    assert manifest.architecture["max_pool"] is ("--max-pool" in extra)
    from app.nets.bundles import load_bundle

    _, net = load_bundle(bundle)
    assert net.feature_dim == pooled * 128
    graph = (bundle / "model.onnx").read_bytes()
    assert max_difference(graph, net, manifest, check_batch((64, 32))) < 1e-4


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--erase-p", "erase_p must be in [0, 1], got 1.5"),
        ("--label-smoothing", "label_smoothing must be in [0, 1)"),
    ],
)
def test_cli_refuses_out_of_range_augmentation_and_smoothing(course_root, tmp_path, option, message):
    result = CliRunner().invoke(app, _train_args(course_root, tmp_path, option, "1.5"))
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
