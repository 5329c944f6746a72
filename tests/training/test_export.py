"""Run -> bundle: same outputs before and after export, fp16 within tolerance, manifest contents."""

from __future__ import annotations

import json

import pytest
import torch

from app.attribute_schema import ATTRIBUTE_GROUPS
from app.bundle import read_manifest
from app.nets.bundles import load_bundle
from training.engine import BEST, load_checkpoint
from training.export import ExportError, export_run
from training.tasks.attributes import GROUP_NAMES

FP16_TOLERANCE = 2e-2  # max |logit difference| of an fp16 bundle, on logits of magnitude ~1-10


def trained_model(run_dir):
    from app.nets.bundles import build_network

    ckpt = load_checkpoint(run_dir / BEST)
    model = build_network("attributes", ckpt["architecture"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def test_round_trip_identical(attribute_run, tmp_path):
    bundle = export_run(attribute_run, store=tmp_path, command="test")
    assert bundle == tmp_path / "attributes"
    manifest, loaded = load_bundle(bundle)
    original = trained_model(attribute_run)
    x = torch.randint(0, 256, (4, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        a, b = original(x), loaded(x)
    for name in GROUP_NAMES:
        assert torch.equal(a[name], b[name])
    assert manifest.task == "attributes" and manifest.backbone == "osnet_x0_25"
    assert manifest.input_size == (64, 32) and manifest.weights_dtype == "float32"
    assert [g["name"] for g in manifest.attribute_schema] == [g.name for g in ATTRIBUTE_GROUPS]
    assert manifest.attribute_schema[-1]["classes"][-1] == "multicolour"
    config = json.loads((attribute_run / "config.json").read_text())
    assert manifest.data_fingerprint == config["data_fingerprint"] != ""
    assert manifest.training_config["backbone"] == "osnet_x0_25"
    assert {"mean_accuracy", "mA", "instance_f1", "best_epoch", "majority_baseline"} <= set(manifest.metrics)
    assert manifest.command == "test" and len(manifest.weights_sha256) == 64
    modes = {f.name: f.stat().st_mode & 0o777 for f in bundle.iterdir()}
    assert all(mode == modes["manifest.json"] for mode in modes.values()), modes  # the umask's, for all
    recorded = (attribute_run / "commands.txt").read_text().splitlines()
    assert len(recorded) == 1 and manifest.training_commands == recorded


def test_fp16_within_tolerance(attribute_run, tmp_path):
    bundle = export_run(attribute_run, store=tmp_path, name="attr16", half=True)
    manifest, loaded = load_bundle(bundle)
    assert manifest.weights_dtype == "float16" and manifest.name == "attr16"
    assert (bundle / "weights.safetensors").stat().st_size < 0.6 * (
        export_run(attribute_run, store=tmp_path, name="attr32") / "weights.safetensors"
    ).stat().st_size
    x = torch.randint(0, 256, (4, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        a, b = trained_model(attribute_run)(x), loaded(x)
    for name in GROUP_NAMES:
        torch.testing.assert_close(b[name], a[name], atol=FP16_TOLERANCE, rtol=0)


def test_refuses_overwrite_and_bad_runs(attribute_run, tmp_path):
    export_run(attribute_run, store=tmp_path)
    with pytest.raises(ExportError, match="--force"):
        export_run(attribute_run, store=tmp_path)
    export_run(attribute_run, store=tmp_path, force=True)
    assert read_manifest(tmp_path / "attributes").task == "attributes"
    with pytest.raises(FileNotFoundError):
        export_run(tmp_path / "no-run", store=tmp_path)
    ckpt = load_checkpoint(attribute_run / BEST)
    ckpt["task"] = "mystery"
    (tmp_path / "odd").mkdir()
    torch.save(ckpt, tmp_path / "odd" / BEST)
    with pytest.raises(ExportError, match="mystery"):
        export_run(tmp_path / "odd", store=tmp_path)
