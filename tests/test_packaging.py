"""The wheel ships the default bundles where ``app.settings`` looks for them (models_store/ beside app/)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from app.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("attributes", "reid")  # the two bundles the service loads by default


def bundle_files(name: str) -> set[str]:
    """What the service needs of a shipped bundle on either runtime, relative to models_store/."""
    manifest = read_manifest(ROOT / "models_store" / name)
    assert manifest.onnx is not None
    return {f"{name}/{f}" for f in ("manifest.json", manifest.onnx.file, manifest.weights_file)}


def test_pyproject_ships_the_bundles_as_package_data():
    """Checked without a build (CI's fresh venv may have a setuptools too old to build a wheel)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch.fnmatch("models_store", p) for p in setuptools["packages"]["find"]["include"])
    store = ROOT / "models_store"
    patterns = setuptools["package-data"]["models_store"]
    matched = {str(path.relative_to(store)) for pattern in patterns for path in store.glob(pattern)}
    for name in SHIPPED:
        assert bundle_files(name) <= matched, name


def test_built_wheel_contains_the_bundles(tmp_path):
    """Build the wheel from a copy of the sources (about a second) and look inside."""
    pytest.importorskip("setuptools.command.bdist_wheel", reason="needs setuptools>=70.1 to build a wheel")
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("app", "training", "models_store"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "app/settings.py" in names
    # The web console's files (package data, not modules): without them /ui answers 404 from a wheel.
    assert {f"app/console/static/{f.name}" for f in (ROOT / "app/console/static").iterdir()} <= names
    for name in SHIPPED:
        assert {f"models_store/{f}" for f in bundle_files(name)} <= names, name
