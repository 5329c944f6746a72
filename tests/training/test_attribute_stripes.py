"""Stripe pooling for the attribute heads: bins, features, CLI -> bundle -> ONNX graph."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from app.bundle import read_manifest
from app.nets.attributes import AttributeNet, AttributeNetConfig, stripe_bins
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


def test_features_are_the_global_average_then_each_stripe():
    torch.manual_seed(0)
    net = AttributeNet(AttributeNetConfig(backbone="osnet_x0_25", input_size=(64, 32), stripes=2)).eval()
    assert net.feature_dim == 3 * 128
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        fmap = net.last_stage(net.trunk(net.normalize(x)))
        feat = net.features(x)
    rows = fmap.shape[2]
    torch.testing.assert_close(feat[:, :128], fmap.mean((2, 3)))
    torch.testing.assert_close(feat[:, 128:256], fmap[:, :, : rows // 2].mean((2, 3)))
    torch.testing.assert_close(feat[:, 256:], fmap[:, :, rows // 2 :].mean((2, 3)))
    assert not torch.allclose(feat[:, 128:256], feat[:, 256:])
    with pytest.raises(ValueError, match="stripes must be >= 0"):
        AttributeNet(AttributeNetConfig(backbone="osnet_x0_25", input_size=(64, 32), stripes=-1))


def test_cli_run_with_stripes_exports_a_bundle_whose_graph_matches(course_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train-attributes", "--data-root", str(course_root), "--backbone", "osnet_x0_25",
        "--input-size", "64x32", "--epochs", "1", "--batch-size", "16", "--run-dir", str(run_dir),
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", "--stripes", "2",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "global average and 2 horizontal stripes" in (run_dir / "report.md").read_text()
    bundle = export_run(run_dir, store=tmp_path / "store", command="test")
    manifest = read_manifest(bundle)
    assert manifest.architecture["stripes"] == 2 and manifest.onnx is not None
    from app.nets.bundles import load_bundle

    _, net = load_bundle(bundle)
    assert net.feature_dim == 3 * 128
    graph = (bundle / "model.onnx").read_bytes()
    assert max_difference(graph, net, manifest, check_batch((64, 32))) < 1e-4
