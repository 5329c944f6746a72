"""ONNX Runtime and the torch fallback: same numbers, verified graphs, the choice between them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.bundle import MANIFEST, BundleError, read_manifest
from app.main import create_app, preflight
from app.runtimes import OnnxRuntime, TorchRuntime, choose_runtime
from tests.service.helpers import (
    Bundles,
    crop,
    enroll,
    files,
    make_attribute_bundle,
    make_reid_bundle,
    make_settings,
    query,
    sqlite_url,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", ["attributes", "reid"])
def test_graph_equals_torch_on_random_input(bundles, task):
    directory = getattr(bundles, task)
    manifest = read_manifest(directory)
    onnx = OnnxRuntime(directory, manifest, threads=1)
    torch_ = TorchRuntime(directory, manifest, threads=1)
    # a batch size the export never saw: the batch axis is dynamic
    batch = np.random.default_rng(7).integers(0, 256, (5, 3, *manifest.input_size), dtype=np.uint8)
    ours, theirs = onnx.run(batch), torch_.run(batch)
    assert len(ours) == len(theirs) == (12 if task == "attributes" else 1)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.shape[0] == 5
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_replaced_graph_is_refused(bundles, tmp_path):
    directory = copy_bundle(bundles.reid, tmp_path / "reid")
    graph = directory / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256 does not match"):
        OnnxRuntime(directory, read_manifest(directory), threads=1)
    settings = make_settings(Bundles(bundles.attributes, directory), tmp_path / "data")
    problem = preflight(settings)
    assert problem is not None and "model.onnx: sha256 does not match the manifest" in problem
    assert "\n" not in problem


def test_a_graph_that_does_not_fit_the_manifest_is_refused(bundles, tmp_path):
    directory = copy_bundle(bundles.reid, tmp_path / "reid")
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["embedding"]["dim"] = 128
    (directory / MANIFEST).write_text(json.dumps(manifest))
    settings = make_settings(Bundles(bundles.attributes, directory), tmp_path / "data")
    with pytest.raises(BundleError, match=r"embedding\.dim is 128"), TestClient(create_app(settings)):
        pass


def test_the_runtime_choice(bundles):
    manifest = read_manifest(bundles.reid)
    assert choose_runtime(manifest, None, "cpu") == "onnx"
    assert choose_runtime(manifest, "torch", "cpu") == "torch"
    assert choose_runtime(manifest, None, "cuda") == "torch"
    bare = manifest.model_copy(update={"onnx": None})
    assert choose_runtime(bare, None, "cpu") == "torch"
    with pytest.raises(BundleError, match=r"no ONNX graph.*add-onnx"):
        choose_runtime(bare, "onnx", "cpu")


@pytest.mark.parametrize("value", ["", "auto", " AUTO "])
def test_an_empty_or_auto_runtime_setting_means_the_automatic_choice(monkeypatch, value):
    # docker-compose.yml passes REID_RUNTIME: ${REID_RUNTIME:-}, an empty string when it is not set.
    from app.settings import Settings

    monkeypatch.setenv("REID_RUNTIME", value)
    assert Settings().runtime is None
    monkeypatch.setenv("REID_RUNTIME", "onnx")
    assert Settings().runtime == "onnx"
    monkeypatch.setenv("REID_RUNTIME", "tensorflow")
    with pytest.raises(ValueError, match="onnx"):
        Settings()


@pytest.fixture(scope="module")
def torch_only(tmp_path_factory) -> Bundles:
    root = tmp_path_factory.mktemp("torch-only")
    return Bundles(
        make_attribute_bundle(root / "attributes", onnx=False), make_reid_bundle(root / "reid", onnx=False)
    )


def test_a_bundle_without_graph_runs_on_torch_with_a_log_line(torch_only, tmp_path, caplog, people):
    settings = make_settings(torch_only, tmp_path / "data", database_url=sqlite_url(tmp_path))
    with caplog.at_level(logging.WARNING, logger="app.runtimes"), TestClient(create_app(settings)) as client:
        body = client.get("/models").json()
        assert body["reid"]["runtime"] == "torch" and body["attributes"]["runtime"] == "torch"
        (entry,) = enroll(client, crop(people[0]))
        assert query(client, crop(people[0]))[0]["entry_id"] == entry["id"]
    assert "the bundle has no ONNX graph; running it on torch" in caplog.text


def test_both_runtimes_return_the_same_matches(bundles, tmp_path, people):
    """One gallery, enrolled on ONNX Runtime, queried by a second app on torch: same ranking, scores."""
    url = sqlite_url(tmp_path)
    answers = {}
    for runtime in ("onnx", "torch"):
        settings = make_settings(bundles, tmp_path / "data", database_url=url, runtime=runtime)
        with TestClient(create_app(settings)) as client:
            assert client.get("/models").json()["reid"]["runtime"] == runtime
            assert f'runtime="{runtime}"' in client.get("/metrics").text
            if runtime == "onnx":
                enroll(client, *[crop(p, cam) for p in people[:12] for cam in (1, 2)], collection="c")
            answers[runtime] = [query(client, crop(p, 3), top_k=10, collection="c") for p in people[:6]] + [
                client.post("/attributes", files=files(crop(people[0], 3))).json()
            ]
    for ours, theirs in zip(answers["onnx"][:-1], answers["torch"][:-1], strict=True):
        assert [m["entry_id"] for m in ours] == [m["entry_id"] for m in theirs]
        assert np.allclose([m["score"] for m in ours], [m["score"] for m in theirs], atol=1e-4)
    values = [{k: v["value"] for k, v in a[-1]["crops"][0]["attributes"].items()} for a in answers.values()]
    assert values[0] == values[1]


SERVICE_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from pathlib import Path
from fastapi.testclient import TestClient
from app.main import create_app, preflight
from app.settings import Settings

settings = Settings(attribute_bundle=sys.argv[1], reid_bundle=sys.argv[2], data_dir=sys.argv[3])
problem = preflight(settings)
if problem:
    print("PREFLIGHT", problem)
    sys.exit(3)
blob = Path(sys.argv[4]).read_bytes()
with TestClient(create_app(settings)) as client:
    enrolled = client.post("/gallery", files=[("images", ("a.png", blob, "image/png"))])
    assert enrolled.status_code == 201, enrolled.text
    matches = client.post("/reid/query", files=[("image", ("a.png", blob, "image/png"))]).json()["matches"]
    assert matches[0]["entry_id"] == enrolled.json()["entries"][0]["id"], matches
    assert client.get("/models").json()["reid"]["runtime"] == "onnx"
print("OK")
"""


def run_without_torch(bundles: Bundles, tmp_path: Path, blob: bytes) -> subprocess.CompletedProcess:
    image = tmp_path / "crop.png"
    image.write_bytes(blob)
    args = [str(bundles.attributes), str(bundles.reid), str(tmp_path / "data"), str(image)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SERVICE_WITHOUT_TORCH), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_the_service_runs_without_torch(bundles, tmp_path, people):
    result = run_without_torch(bundles, tmp_path, crop(people[0]))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_without_torch_a_bundle_without_graph_is_a_clear_start_up_error(torch_only, tmp_path, people):
    result = run_without_torch(torch_only, tmp_path, crop(people[0]))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "torch is not installed" in result.stdout and "add-onnx" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_reid_train_on_a_service_only_install_says_what_to_install():
    code = 'import sys; sys.modules["torch"] = None; from training.launcher import main; main()'
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 1 and "pip install 'reid-stack[train]'" in result.stderr
    assert "Traceback" not in result.stderr
