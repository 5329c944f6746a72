"""Start-up paths: defaults, fail-fast without bundles, settings from the environment, `reid-serve`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app, preflight, serve
from app.settings import SHIPPED_MODELS_DIR, Settings
from tests.service.helpers import crop, enroll, files, query, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def clear_reid_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("REID_"):
            monkeypatch.delenv(name)


def reid_serve() -> list[str]:
    script = Path(sys.executable).with_name("reid-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_defaults_need_no_configuration(monkeypatch):
    clear_reid_env(monkeypatch)
    monkeypatch.chdir(ROOT)  # a directory holding models_store/: that one is used, as given
    settings = Settings()
    assert settings.attribute_bundle_dir == Path("models_store/attributes")
    assert settings.reid_bundle_dir == Path("models_store/reid")
    assert settings.database == "sqlite:///data/gallery.sqlite3"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.api_keys == []
    monkeypatch.setenv("REID_MODELS_DIR", "/srv/models")
    monkeypatch.setenv("REID_API_KEYS", "a, b ,")
    settings = Settings()
    assert settings.reid_bundle_dir == Path("/srv/models/reid")
    assert settings.key_bytes() == [b"a", b"b"]


def test_shipped_bundles_are_found_from_any_directory(monkeypatch, tmp_path, bundles):
    """`reid-serve` outside the checkout (no ./models_store) uses the bundles shipped with the package;
    REID_MODELS_DIR and the per-bundle variables still win."""
    clear_reid_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert SHIPPED_MODELS_DIR == ROOT / "models_store"  # beside app/, as the wheel installs it
    assert settings.attribute_bundle_dir == ROOT / "models_store" / "attributes"
    assert settings.reid_bundle_dir == ROOT / "models_store" / "reid"
    assert preflight(settings) is None
    monkeypatch.setenv("REID_ATTRIBUTE_BUNDLE", str(bundles.attributes))
    assert Settings().attribute_bundle_dir == bundles.attributes
    assert Settings().reid_bundle_dir == ROOT / "models_store" / "reid"
    monkeypatch.setenv("REID_MODELS_DIR", str(bundles.reid.parent))
    assert Settings().reid_bundle_dir == bundles.reid


def test_missing_bundles_fail_fast_with_one_line(monkeypatch, tmp_path, bundles):
    clear_reid_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REID_MODELS_DIR", "models_store")  # absent here (unset: the shipped bundles)
    with pytest.raises(SystemExit) as exc:
        serve([])
    message = str(exc.value.code)
    assert "\n" not in message
    assert "attributes bundle not found at models_store/attributes" in message and "reid-train" in message

    monkeypatch.setenv("REID_ATTRIBUTE_BUNDLE", str(bundles.attributes))
    with pytest.raises(SystemExit) as exc:
        serve([])
    assert "reid bundle not found at models_store/reid" in str(exc.value.code)

    monkeypatch.setenv("REID_REID_BUNDLE", str(bundles.attributes))  # a bundle of the wrong task
    with pytest.raises(SystemExit) as exc:
        serve([])
    assert "'attributes' bundle where a 'reid' bundle was expected" in str(exc.value.code)


def test_unreachable_database_fails_fast_with_one_line(monkeypatch, bundles):
    clear_reid_env(monkeypatch)
    monkeypatch.setenv("REID_ATTRIBUTE_BUNDLE", str(bundles.attributes))
    monkeypatch.setenv("REID_REID_BUNDLE", str(bundles.reid))
    monkeypatch.setenv("REID_DATABASE_URL", "postgresql+psycopg://reid:secret@127.0.0.1:1/nowhere")
    with pytest.raises(SystemExit) as exc:
        serve([])
    message = str(exc.value.code)
    assert message.startswith(
        "reid-serve: cannot open the database postgresql+psycopg://reid:***@127.0.0.1:1/"
    )
    assert "\n" not in message and "secret" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_fails_fast(monkeypatch, bundles):
    clear_reid_env(monkeypatch)
    monkeypatch.setenv("REID_MODELS_DIR", str(bundles.attributes.parent))
    monkeypatch.setenv("REID_DEVICE", "cuda")
    with pytest.raises(SystemExit) as exc:
        serve([])
    assert "REID_DEVICE is cuda but torch sees no CUDA device" in str(exc.value.code)


def test_reid_serve_without_bundles_prints_one_line(tmp_path, monkeypatch):
    clear_reid_env(monkeypatch)
    monkeypatch.setenv("REID_MODELS_DIR", str(tmp_path / "models_store"))  # absent
    result = subprocess.run(reid_serve(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "models_store/attributes" in lines[0] and "Traceback" not in result.stderr


def test_create_app_reads_the_environment(monkeypatch, bundles, database_url, tmp_path, people):
    """The container's path: everything from REID_* variables, nothing passed in."""
    clear_reid_env(monkeypatch)
    monkeypatch.setenv("REID_ATTRIBUTE_BUNDLE", str(bundles.attributes))
    monkeypatch.setenv("REID_REID_BUNDLE", str(bundles.reid))
    monkeypatch.setenv("REID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("REID_DATABASE_URL", database_url)
    with TestClient(create_app()) as client:
        (entry,) = enroll(client, crop(people[0]), identity="env")
        assert query(client, crop(people[0]), top_k=1)[0]["entry_id"] == entry["id"]
    if database_url.startswith("sqlite"):
        assert Path(database_url.removeprefix("sqlite:///")).is_file()


def test_reid_serve_runs_with_shipped_layout(monkeypatch, bundles, database_url, tmp_path, people):
    """`reid-serve --port` in a directory holding models_store/: SQLite under ./data unless
    REID_DATABASE_URL says otherwise; --port overrides REID_PORT."""
    clear_reid_env(monkeypatch)
    shutil.copytree(bundles.attributes, tmp_path / "models_store" / "attributes")
    shutil.copytree(bundles.reid, tmp_path / "models_store" / "reid")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env["REID_PORT"] = "1"  # overridden by --port
    if not database_url.startswith("sqlite"):
        env["REID_DATABASE_URL"] = database_url
    port = free_port()
    process = subprocess.Popen(
        [*reid_serve(), "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(process, base)
        with httpx.Client(base_url=base, timeout=30) as client:
            response = client.post("/gallery", files=files(crop(people[0])), data={"identity": "served"})
            assert response.status_code == 201, response.text
            (best,) = query(client, crop(people[0]), top_k=1)
            assert best["identity"] == "served"
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "REID_API_KEYS is not set" in output
    if database_url.startswith("sqlite"):
        assert (tmp_path / "data" / "gallery.sqlite3").is_file()
