"""The ``reid-train`` entry point: a clear message, not a traceback, on a service-only install."""

from __future__ import annotations

import importlib.util
import sys

NEEDED = ("torch", "typer", "tqdm", "matplotlib")


def _importable(name: str) -> bool:
    if name in sys.modules:  # imported already, or blocked (None)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def main() -> None:
    """Run ``training.cli`` when the training dependencies are installed."""
    missing = [name for name in NEEDED if not _importable(name)]
    if missing:
        sys.exit(
            f"reid-train: training needs {', '.join(missing)}, which this install lacks (the base package "
            "is the service only); install the extra: pip install 'reid-stack[train]'"
        )
    from training.cli import main as cli_main

    cli_main()
