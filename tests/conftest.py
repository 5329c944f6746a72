"""Shared fixtures: tiny generated datasets in both layouts, and the real data when it is there.

Tests marked ``shared_data`` need ``../shared/data/market1501`` (or ``REID_DATA_ROOT``) and are skipped
when it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so tests can `from tests.synthetic import ...`

from tests.synthetic import make_course_dataset, make_original_dataset  # noqa: E402

SHARED_DATA = Path(os.environ.get("REID_DATA_ROOT", ROOT.parent / "shared" / "data" / "market1501"))
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights"

# Tiny tensors gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that wait
# on each other make the tests many times slower (measured: 20x for a 64x32 OSNet forward under load).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if (SHARED_DATA / "train").is_dir() or (SHARED_DATA / "bounding_box_train").is_dir():
        return
    skip = pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def course_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Course layout: 12 identities x 6 images of 64x32, annotations_train.csv (read-only: copy to change)."""
    root = tmp_path_factory.mktemp("course")
    make_course_dataset(root, n_ids=12, images_per_id=6)
    return root


@pytest.fixture(scope="session")
def original_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Original layout: 8 train + 6 test identities, one junk and one distractor, market_attribute.mat."""
    pytest.importorskip("scipy")
    root = tmp_path_factory.mktemp("original")
    make_original_dataset(root, n_train=8, n_test=6, images_per_id=6)
    return root


@pytest.fixture(scope="session")
def learn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger course-layout set for learning tests: 40 identities x 8 images of 64x32."""
    root = tmp_path_factory.mktemp("learn")
    make_course_dataset(root, n_ids=40, images_per_id=8, seed=3)
    return root


@pytest.fixture(scope="session")
def attribute_run(course_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch attribute run (osnet_x0_25, random init, 64x32) made through the CLI."""
    from typer.testing import CliRunner

    from training.cli import app

    run_dir = tmp_path_factory.mktemp("runs") / "attributes"
    args = [
        "train-attributes", "--data-root", str(course_root), "--backbone", "osnet_x0_25",
        "--input-size", "64x32", "--epochs", "2", "--batch-size", "16", "--run-dir", str(run_dir),
        "--cache-dir", str(run_dir.parent / "cache"), "--device", "cpu", "--no-progress",
        "--monitor", "mA",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return run_dir
