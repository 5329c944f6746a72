"""The attribute task: labels, batches, and a learning test on generated data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.attribute_schema import ATTRIBUTE_GROUPS
from app.nets import backbones
from tests.synthetic import make_course_dataset
from training.config import AttributeTrainConfig
from training.engine import Trainer, seed_everything
from training.evaluation.attributes import majority_baseline
from training.tasks.attributes import AttributeTask, label_matrix, load_attribute_data


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def tiny_backbone(init_weights: str | None, last_stride: int) -> backbones.BackboneParts:
    """A five-layer CNN: learns the drawn attributes in seconds from random init."""
    trunk = nn.Sequential(_block(3, 16, 1), _block(16, 32, 2), _block(32, 64, 2))
    return backbones.BackboneParts(trunk, nn.Sequential(_block(64, 64, 2), _block(64, 64, 1)), 64)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_backbone)
    return "tiny"


def test_data_labels_and_batches(course_root, tmp_path):
    cfg = AttributeTrainConfig(
        data_root=str(course_root), input_size=(32, 16), batch_size=10, cache_dir="", progress=False
    )
    data = load_attribute_data(cfg, tmp_path)
    assert cfg.layout == "course" and len(cfg.data_fingerprint) == 64
    assert data.train_images.shape == (len(data.train), 3, 32, 16)
    assert data.val_labels.shape == (len(data.val), 12)
    assert not {s.pid for s in data.train} & {s.pid for s in data.val}
    assert (tmp_path / "split.json").is_file()
    first = data.train[0]
    assert data.train_labels[0].tolist() == [
        data.data.attributes[first.pid][g.name] for g in ATTRIBUTE_GROUPS
    ]
    task = AttributeTask(cfg, data)
    batches = task.train_batches(1)
    sizes = [len(x) for x, _ in batches]
    assert sum(sizes) == len(data.train) and len(batches) == len(sizes)
    again = [y for _, y in task.train_batches(1)]
    assert all(torch.equal(a, b) for a, b in zip(again, [y for _, y in task.train_batches(1)], strict=True))


def test_label_matrix_empty():
    assert label_matrix([], {}).shape == (0, 12)


def test_learns_on_generated_data(tmp_path, tiny):
    """Validation accuracy clearly above the majority-class baseline after a few epochs."""
    make_course_dataset(tmp_path / "data", n_ids=100, images_per_id=4, size=(32, 16), seed=3)
    cfg = AttributeTrainConfig(
        data_root=str(tmp_path / "data"), backbone=tiny, input_size=(32, 16), epochs=8, batch_size=32,
        lr=3e-3, patience=0, flip=False, pad=1, erase_p=0.0, cache_dir="", device="cpu", progress=False,
    )  # fmt: skip
    seed_everything(0)
    data = load_attribute_data(cfg, tmp_path / "run")
    result = Trainer(cfg, tmp_path / "run").fit(AttributeTask(cfg, data))
    baseline = majority_baseline(data.train_labels, data.val_labels)
    best = max(r["mean_accuracy"] for r in result.history)
    assert best > baseline["mean_accuracy"] + 0.1, (best, baseline["mean_accuracy"])
    last = result.history[-1]
    for group in ("upper_colour", "lower_colour"):  # drawn big: learnt first
        assert last[f"accuracy/{group}"] > baseline[f"accuracy/{group}"] + 0.3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_original_layout_data(original_root, tmp_path):
    cfg = AttributeTrainConfig(
        data_root=str(original_root), input_size=(32, 16), cache_dir="", progress=False
    )
    data = load_attribute_data(cfg, tmp_path)
    assert cfg.layout == "original"
    assert len(data.train) + len(data.val) == 8 * 6  # bounding_box_train only
    assert data.train_labels.shape == (len(data.train), 12)
