"""app/ never imports training/; training/ runs without the service's dependencies; inside app/, imports
run from the API layer down, never up into it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ONLY = ("fastapi", "faiss", "sqlalchemy", "pydantic_settings", "uvicorn", "multipart")
ALLOWED_APP = (
    "app.attribute_schema",
    "app.nets",
    "app.bundle",
    "app.preprocess",
    "app.retrieval",
    "app.runtimes",
)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_app_never_imports_training():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "app").rglob("*.py"))
        for name in imported_modules(path)
        if name == "training" or name.startswith("training.")
    ]
    assert offenders == []


def test_only_main_imports_the_api_layer_and_the_bodies_import_nothing_of_app():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "app").rglob("*.py"))
        if path.parent != ROOT / "app" / "api" and path != ROOT / "app" / "main.py"
        for name in imported_modules(path)
        if name == "app.api" or name.startswith("app.api.")
    ]
    assert offenders == []
    bodies = imported_modules(ROOT / "app" / "api" / "bodies.py")
    assert [name for name in bodies if name == "app" or name.startswith("app.")] == []


def test_training_imports_only_the_shared_part_of_app():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "training").rglob("*.py"))
        for name in imported_modules(path)
        if (name == "app" or name.startswith("app.")) and not name.startswith(ALLOWED_APP)
    ]
    assert offenders == []


def test_training_imports_without_service_dependencies():
    """Import every training module with the service-only packages made unimportable."""
    code = f"""
import importlib, pkgutil, sys
for name in {SERVICE_ONLY!r}:
    sys.modules[name] = None
import training
for info in pkgutil.walk_packages(training.__path__, "training."):
    importlib.import_module(info.name)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
