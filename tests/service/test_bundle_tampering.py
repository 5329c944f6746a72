"""A bundle that was tampered with stops `reid-serve` at start-up with one line, never a traceback.

Each case edits a copy of a shipped bundle in tmp_path and runs ``serve`` in this process, with the
server itself replaced by a failure: a tampered bundle that got through the checks would start it.
ONNX Runtime (the default) runs the bundle's model.onnx; torch (``REID_RUNTIME=torch``) runs
weights.safetensors; each file is checked by the runtime that uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from safetensors.numpy import load_file, save_file

from app.bundle import file_sha256, read_manifest
from app.main import serve
from app.settings import SHIPPED_MODELS_DIR
from tests.service.helpers import crop, files
from tests.service.test_serve_startup import clear_reid_env, reid_serve
from tests.synthetic import make_identities

Tamper = Callable[[Path], None]  # edits a copy of models_store/ (attributes/ and reid/ in it)


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def newer_format(models: Path) -> None:
    edit_manifest(models / "reid", lambda m: m.update(format_version=m["format_version"] + 1))


def invalid_manifest(models: Path) -> None:
    """A field of the wrong type: pydantic's report of it spans several lines."""
    edit_manifest(models / "reid", lambda m: m.update(input_size="tall"))


def corrupt_graph(models: Path) -> None:
    flip_a_byte(models / "reid" / "model.onnx")


def corrupt_weights(models: Path) -> None:
    flip_a_byte(models / "reid" / "weights.safetensors")


def weights_of_another_architecture(models: Path) -> None:
    """Weights missing a tensor the architecture has, with the manifest's sha256 updated to them: the
    checksum passes, the network does not fit."""
    weights = models / "reid" / "weights.safetensors"
    tensors = load_file(weights)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, weights)
    edit_manifest(models / "reid", lambda m: m.update(weights_sha256=file_sha256(weights)))


def schema_without_a_class(models: Path) -> None:
    """The attribute schema's last group loses a class; the network still has a head for it."""
    edit_manifest(models / "attributes", lambda m: m["attribute_schema"][-1]["classes"].pop())


SHIPPED_DIM = read_manifest(SHIPPED_MODELS_DIR / "reid").embedding.dim


def wrong_embedding_dim(models: Path) -> None:
    edit_manifest(models / "reid", lambda m: m["embedding"].update(dim=m["embedding"]["dim"] // 2))


CASES = [
    pytest.param(newer_format, None, "format version 2, this build reads 1", id="format-version"),
    pytest.param(invalid_manifest, None, "invalid manifest", id="manifest-field"),
    pytest.param(corrupt_graph, "onnx", "model.onnx: sha256 does not match the manifest", id="onnx-sha256"),
    pytest.param(
        corrupt_weights,
        "torch",
        "weights.safetensors: sha256 does not match the manifest",
        id="weights-sha256",
    ),
    pytest.param(
        weights_of_another_architecture,
        "torch",
        "weights do not fit the manifest's architecture",
        id="weights-architecture",
    ),
    *[
        pytest.param(
            schema_without_a_class,
            runtime,
            "does not match the network's heads",
            id=f"schema-heads-{runtime}",
        )
        for runtime in ("onnx", "torch")
    ],
    *[
        pytest.param(
            wrong_embedding_dim,
            runtime,
            f"the manifest's embedding.dim is {SHIPPED_DIM // 2}",
            id=f"embedding-dim-{runtime}",
        )
        for runtime in ("onnx", "torch")
    ],
]


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the shipped attribute and re-ID bundles."""
    models = tmp_path / "models_store"
    for name in ("attributes", "reid"):
        shutil.copytree(SHIPPED_MODELS_DIR / name, models / name)
    return models


def configure(monkeypatch: pytest.MonkeyPatch, models: Path, runtime: str | None) -> None:
    clear_reid_env(monkeypatch)
    monkeypatch.setenv("REID_MODELS_DIR", str(models))
    monkeypatch.setenv("REID_DATA_DIR", str(models.parent / "data"))
    if runtime is not None:
        monkeypatch.setenv("REID_RUNTIME", runtime)


def no_server(*args, **kwargs) -> None:
    raise AssertionError("reid-serve started its server: the tampered bundle got through")


def test_the_untouched_copy_starts(monkeypatch, shipped_copy):
    """The cases below fail for their tampering, not for the copy. The server gets the models that
    `reid-serve` loaded, and its lifespan uses them (forward passes reach its metrics)."""
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    for runtime in ("onnx", "torch"):
        configure(monkeypatch, shipped_copy, runtime)
        serve([])
    assert [app.state.loaded_models.reid.runtime.name for app in started] == ["onnx", "torch"]
    with TestClient(started[0]) as client:
        assert client.app.state.models is started[0].state.loaded_models
        assert client.post("/attributes", files=files(crop(make_identities(1)[0]))).status_code == 200
        assert 'reid_inference_crops_total{task="attributes"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize(("tamper", "runtime", "reason"), CASES)
def test_a_tampered_bundle_stops_start_up_in_one_line(monkeypatch, shipped_copy, tamper, runtime, reason):
    tamper(shipped_copy)
    configure(monkeypatch, shipped_copy, runtime)
    monkeypatch.setattr(uvicorn, "run", no_server)
    with pytest.raises(SystemExit) as exc:
        serve([])
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("reid-serve: "), message
    assert "\n" not in message and "Traceback" not in message
    assert reason in message, message
    assert str(shipped_copy) in message  # which bundle


def test_reid_serve_prints_one_line_for_a_bundle_that_fails_to_load(shipped_copy):
    """The command itself, for a bundle that passes the file checks and fails only once loaded."""
    schema_without_a_class(shipped_copy)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env["REID_MODELS_DIR"] = str(shipped_copy)
    result = subprocess.run(
        reid_serve(), cwd=shipped_copy.parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("reid-serve: ") and "does not match the network's heads" in lines[0]
