"""Ensemble bundles (``reid-train ensemble-bundle``): several re-ID networks as one embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from app.bundle import read_manifest
from app.nets.bundles import load_bundle
from app.runtimes import open_runtime
from tests.training.test_reid_bundle import write_run
from training.cli import app
from training.ensemble import ensemble_bundle
from training.export import ExportError, export_run, flip_bundle
from training.tasks.reid import ReIDTrainConfig


@pytest.fixture
def members(tmp_path):
    """Two exported re-ID bundles: one at 64x32, one at 32x16 whose 160-wide branches span 129
    dimensions each (OSNet x0.25's 128 channels, plus the BatchNorm shift)."""
    store = tmp_path / "store"
    write_run(tmp_path / "big")
    big = export_run(tmp_path / "big", store=store, name="big")
    torch.manual_seed(1)
    small_run = tmp_path / "small"
    small_run.mkdir()
    from app.nets.reid import ReIDNet, ReIDNetConfig
    from training.engine import BEST

    net = ReIDNet(ReIDNetConfig("osnet_x0_25", (32, 16), num_classes=5, branch_dim=160))
    with torch.no_grad():  # non-trivial BN statistics and shifts, which the projection must keep
        for bn in (b.neck for b in net.branches.values()):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.3, 0.3)
    config = ReIDTrainConfig.from_recipe(
        "modern", backbone="osnet_x0_25", input_size=(32, 16), branch_dim=160
    )
    torch.save(
        {"task": "reid", "epoch": 2, "model": net.state_dict(), "architecture": net.config.to_dict(),
         "metrics": {"mAP": 0.4, "match_threshold": 0.6}, "config": config.to_dict()},
        small_run / BEST,
    )  # fmt: skip
    small = export_run(small_run, store=store, name="small")
    return store, big, small


def test_similarity_is_the_weighted_mean_of_the_members_and_the_graph_computes_it(members):
    store, big, small = members
    directory = ensemble_bundle([big, small], [3, 1], store=store, name="ens")
    manifest, ensemble = load_bundle(directory)
    _, big_net = load_bundle(big)
    _, small_net = load_bundle(small)
    # 2 x 16 values from the first member; the second's 2 x 160 projected onto the 2 x 129 they span
    assert manifest.embedding.dim == 32 + 2 * 129 and manifest.input_size == (64, 32)
    assert [m["weight"] for m in manifest.architecture["ensemble"]] == [0.75, 0.25]
    assert manifest.metrics == {} and manifest.match_threshold is None  # measured anew
    torch.manual_seed(2)
    x = torch.randint(0, 256, (4, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        emb = ensemble(x)
        a = big_net(x)
        # the small member sees each 2x2 block's mean, computed here another way than the network does
        b = small_net(F.avg_pool2d(x.float() / 255.0, 2))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb @ emb.T, 0.75 * (a @ a.T) + 0.25 * (b @ b.T), atol=1e-5, rtol=1e-4)
    # what the service runs: the ONNX graph and the torch fallback agree with the network
    for runtime in ("onnx", "torch"):
        opened = open_runtime(directory, manifest, requested=runtime, device="cpu", threads=1)
        (out,) = opened.run(x.numpy())
        np.testing.assert_allclose(out, emb.numpy(), atol=1e-5)


def test_version_follows_the_member_weights_and_members_must_fit(members, tmp_path):
    store, big, small = members
    equal = read_manifest(ensemble_bundle([big, small], [1, 1], store=store, name="equal"))
    tilted = read_manifest(ensemble_bundle([big, small], [2, 1], store=store, name="tilted"))
    assert equal.weights_sha256 == tilted.weights_sha256 and equal.version != tilted.version
    commands = read_manifest(big).training_commands + read_manifest(small).training_commands
    assert equal.training_commands == commands
    with pytest.raises(ExportError, match="put the largest first"):
        ensemble_bundle([small, big], [1, 1], store=store, name="upsampled")
    with pytest.raises(ExportError, match="two or more"):
        ensemble_bundle([big], [1], store=store, name="alone")
    with pytest.raises(ExportError, match="positive"):
        ensemble_bundle([big, small], [1, 0], store=store, name="zero")
    with pytest.raises(ExportError, match="ensemble already"):
        ensemble_bundle([store / "equal", small], [1, 1], store=store, name="nested")
    with pytest.raises(ExportError, match="flip its members"):
        flip_bundle(store / "equal", store=store, name="flipped")
    with pytest.raises(ExportError, match="already holds a bundle"):
        ensemble_bundle([big, small], [1, 1], store=store, name="equal")
    # members trained on every identity: the split ensemble's validation is carried, and required
    data = json.loads((small / "manifest.json").read_text())
    data["training_config"]["train_all"] = True
    (small / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="--metrics-from the ensemble of the split-trained members"):
        ensemble_bundle([big, small], [1, 1], store=store, name="all")
    with pytest.raises(ExportError, match="not an ensemble of 2 bundles"):
        ensemble_bundle([big, small], [1, 1], store=store, name="all", metrics_from=big)
    data = json.loads((store / "equal" / "manifest.json").read_text())
    data["metrics"], data["match_threshold"] = {"mAP": 0.42}, 0.5
    (store / "equal" / "manifest.json").write_text(json.dumps(data))
    every = read_manifest(
        ensemble_bundle([big, small], [1, 1], store=store, name="all", metrics_from=store / "equal")
    )
    assert every.training_config["train_all"] and every.metrics["mAP"] == 0.42
    assert every.match_threshold == 0.5
    assert every.metrics["metrics_from"] == f"equal {equal.version}"


def test_cli_builds_one_and_refuses_bad_input_in_one_line(members):
    store, big, small = members
    runner = CliRunner()
    args = ["ensemble-bundle", str(big), str(small), "--store", str(store), "--name", "cli"]
    result = runner.invoke(app, [*args, "--weight", "0.7", "--weight", "0.3"])
    assert result.exit_code == 0, result.output
    assert "290-d embedding" in result.output
    assert [m["weight"] for m in read_manifest(store / "cli").architecture["ensemble"]] == [0.7, 0.3]
    result = runner.invoke(app, [*args, "--force", "--weight", "1"])
    assert result.exit_code != 0 and "one weight each" in result.output and "Traceback" not in result.output
