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

torch.set_num_threads(min(2, torch.get_num_threads()))


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
