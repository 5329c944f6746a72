"""Re-ID export: the bundle drops the identity classifiers, records the embedding, and embeds the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.bundle import read_manifest
from app.nets.bundles import load_bundle
from app.nets.reid import ReIDNet, ReIDNetConfig
from training.engine import BEST
from training.export import export_run
from training.tasks.reid import ReIDTrainConfig


def write_run(run: Path, **architecture) -> ReIDNet:
    """A run directory holding a best.pt as the Trainer writes it (no training needed)."""
    torch.manual_seed(0)
    run.mkdir(parents=True, exist_ok=True)
    net = ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), num_classes=7, branch_dim=16, **architecture))
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    config = ReIDTrainConfig.from_recipe("modern", backbone="osnet_x0_25", input_size=(64, 32), branch_dim=16)
    metrics = {"epoch": 3, "mAP": 0.5, "rank1": 0.6, "match_threshold": 0.71, "val_loss": 0.2}
    torch.save(
        {
            "task": "reid",
            "epoch": 3,
            "model": net.state_dict(),
            "architecture": net.config.to_dict(),
            "metrics": metrics,
            "config": config.to_dict(),
        },
        run / BEST,
    )
    return net


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path, write_run(tmp_path)


def test_bundle_round_trip(run_dir, tmp_path):
    run, net = run_dir
    directory = export_run(run, store=tmp_path / "store", name="reid-test")
    manifest = read_manifest(directory)
    assert manifest.task == "reid" and manifest.architecture["num_classes"] == 0
    assert manifest.embedding.dim == 32 and manifest.embedding.distance == "cosine"
    assert manifest.match_threshold == pytest.approx(0.71)
    assert manifest.metrics["mAP"] == 0.5 and manifest.metrics["best_epoch"] == 3
    assert manifest.training_config["recipe"] == "modern"
    _, loaded = load_bundle(directory)
    assert not any("classifier" in k for k in loaded.state_dict())
    x = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))


def test_mean_pooling_exponent_and_stride_eight_last_stage_survive_export_and_onnx(tmp_path):
    """The learned GeM exponent is a weight of the bundle, and the graph computes the same pooling."""
    net = write_run(tmp_path / "run", gem_p=3.0, last_stride=1)
    with torch.no_grad():
        net.branches["avg"].pool.p.fill_(2.4)  # as if training had moved it
        net.train()(torch.randint(0, 256, (8, 3, 64, 32), dtype=torch.uint8))  # BN statistics of real maps
    torch.save({**torch.load(tmp_path / "run" / BEST), "model": net.state_dict()}, tmp_path / "run" / BEST)
    directory = export_run(tmp_path / "run", store=tmp_path / "store", name="reid-gem")
    manifest = read_manifest(directory)
    assert manifest.architecture["gem_p"] == 3.0 and manifest.architecture["last_stride"] == 1
    assert manifest.onnx is not None and manifest.onnx.max_abs_diff <= 1e-4
    _, loaded = load_bundle(directory)
    assert float(loaded.branches["avg"].pool.p) == pytest.approx(2.4)
    x = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))


def test_stripe_parts_survive_export_and_onnx(tmp_path):
    """The parts' necks are in the bundle and its graph, their classifiers are not."""
    net = write_run(tmp_path / "run", stripes=2, last_stride=1)
    directory = export_run(tmp_path / "run", store=tmp_path / "store", name="reid-stripes")
    manifest = read_manifest(directory)
    assert manifest.architecture["stripes"] == 2 and manifest.embedding.dim == 2 * 16 + 2 * 128
    assert manifest.onnx is not None and manifest.onnx.max_abs_diff <= 1e-4
    _, loaded = load_bundle(directory)
    assert "stripes.stripe1.neck.running_var" in loaded.state_dict()
    assert not any("classifier" in k for k in loaded.state_dict())
    x = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))


def test_final_metrics_preferred(run_dir, tmp_path):
    run, _ = run_dir
    final = {"validation": {"mAP": 0.55, "match_threshold": 0.66, "cmc": [1.0]}, "protocol": {"queries": 9}}
    (run / "val_metrics.json").write_text(json.dumps(final))
    manifest = read_manifest(export_run(run, store=tmp_path / "store"))
    assert manifest.name == "reid"
    assert manifest.match_threshold == pytest.approx(0.66) and manifest.metrics["mAP"] == 0.55
    assert "cmc" not in manifest.metrics and manifest.metrics["protocol"] == {"queries": 9}


def test_flip_bundle_embeds_each_crop_with_its_mirror_image_under_a_version_of_its_own(run_dir, tmp_path):
    import onnxruntime as ort

    from training.export import ExportError, flip_bundle

    run, net = run_dir
    store = tmp_path / "store"
    plain = read_manifest(export_run(run, store=store, name="reid"))
    directory = flip_bundle(store / "reid", store=store, name="reid-flip")
    flipped, loaded = load_bundle(directory)
    assert flipped.architecture["flip_average"] and flipped.version != plain.version
    assert flipped.weights_sha256 == plain.weights_sha256  # the same weights
    assert flipped.metrics == {} and flipped.match_threshold is None  # validation is measured anew
    x = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        net.eval()
        expected = torch.nn.functional.normalize(net(x) + net(x.flip(-1)), dim=1)
        torch.testing.assert_close(loaded(x), expected)
    session = ort.InferenceSession(str(directory / flipped.onnx.file), providers=["CPUExecutionProvider"])
    (graph,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(graph), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ExportError, match="already embeds with test-time flip"):
        flip_bundle(directory, store=store, name="twice")
    with pytest.raises(ExportError, match="already holds a bundle"):
        flip_bundle(store / "reid", store=store, name="reid-flip")
    # a bundle trained on every identity carries the flipped split bundle's validation
    manifest_file = store / "reid" / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["training_config"]["train_all"] = True
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="--metrics-from the flipped bundle"):
        flip_bundle(store / "reid", store=store, name="all-flip")
    with pytest.raises(ExportError, match="does not embed with test-time flip"):
        flip_bundle(store / "reid", store=store, name="all-flip", metrics_from=store / "reid")
    data = json.loads((directory / "manifest.json").read_text())
    data["metrics"], data["match_threshold"] = {"mAP": 0.42}, 0.5
    (directory / "manifest.json").write_text(json.dumps(data))
    every = read_manifest(flip_bundle(store / "reid", store=store, name="all-flip", metrics_from=directory))
    assert every.metrics["mAP"] == 0.42 and every.match_threshold == 0.5
    assert every.metrics["metrics_from"] == f"reid-flip {flipped.version}"
