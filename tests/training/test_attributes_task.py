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
    sizes = [len(x) for x, *_ in batches]
    assert sum(sizes) == len(data.train) and len(batches) == len(sizes)
    again = [y for _, y, _ in task.train_batches(1)]
    assert all(
        torch.equal(a, b) for a, b in zip(again, [y for _, y, _ in task.train_batches(1)], strict=True)
    )


def test_label_matrix_empty():
    assert label_matrix([], {}).shape == (0, 12)


@pytest.mark.parametrize("stripes", [0, 2])
def test_learns_on_generated_data(tmp_path, tiny, stripes):
    """Validation accuracy clearly above the majority-class baseline after a few epochs."""
    make_course_dataset(tmp_path / "data", n_ids=100, images_per_id=4, size=(32, 16), seed=3)
    cfg = AttributeTrainConfig(
        data_root=str(tmp_path / "data"), backbone=tiny, input_size=(32, 16), epochs=8, batch_size=32,
        lr=3e-3, patience=0, flip=False, pad=1, erase_p=0.0, cache_dir="", device="cpu", progress=False,
        stripes=stripes,
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


def test_apr_identity_loss_learns_and_stays_out_of_the_model(tmp_path, tiny):
    """--id-loss-weight: an identity head trains with the attribute heads (its loss falls), is
    checkpointed with the task for --resume, and is not part of the model that gets exported."""
    make_course_dataset(tmp_path / "data", n_ids=30, images_per_id=4, size=(32, 16), seed=4)
    cfg = AttributeTrainConfig(
        data_root=str(tmp_path / "data"), backbone=tiny, input_size=(32, 16), epochs=6, batch_size=32,
        lr=3e-3, patience=0, flip=False, pad=1, erase_p=0.0, cache_dir="", device="cpu", progress=False,
        id_loss_weight=1.0,
    )  # fmt: skip
    seed_everything(0)
    data = load_attribute_data(cfg, tmp_path / "run")
    task = AttributeTask(cfg, data)
    assert task.id_head is not None and task.id_head.out_features == len({s.pid for s in data.train})
    grouped = {id(p) for g in task.parameter_groups() for p in g["params"]}
    assert {id(p) for p in task.id_head.parameters()} <= grouped
    result = Trainer(cfg, tmp_path / "run").fit(task)
    history = result.history
    assert history[-1]["train_identity"] < 0.85 * history[0]["train_identity"], history
    assert not any(k.startswith("id_head") for k in task.model.state_dict())
    saved = task.state_dict()["id_head"]
    fresh = AttributeTask(cfg, data)
    fresh.load_state_dict({"id_head": saved})
    assert torch.equal(fresh.id_head.weight, task.id_head.weight)


def test_without_identity_loss_no_head(course_root, tmp_path):
    cfg = AttributeTrainConfig(data_root=str(course_root), input_size=(32, 16), cache_dir="", progress=False)
    task = AttributeTask(cfg, load_attribute_data(cfg, tmp_path))
    assert task.id_head is None and task.state_dict() == {}
    loss = task.train_step(next(iter(task.train_batches(1))))
    assert "identity" not in loss
    with pytest.raises(ValueError, match="id_loss_weight"):
        AttributeTrainConfig(id_loss_weight=-1.0)


def test_train_all_uses_every_identity(course_root, tmp_path):
    cfg = AttributeTrainConfig(
        data_root=str(course_root), input_size=(32, 16), cache_dir="", progress=False, train_all=True
    )
    assert (cfg.monitor, cfg.patience) == ("epoch", 0)
    data = load_attribute_data(cfg, tmp_path)
    val_ids = {s.pid for s in data.val}
    assert val_ids and val_ids <= {s.pid for s in data.train}
    assert len(data.train_labels) == len(data.train)
    task = AttributeTask(cfg, data)
    task.train_batches(3)
    assert task.validate() == {"epoch": 3.0}


def test_original_layout_data(original_root, tmp_path):
    cfg = AttributeTrainConfig(
        data_root=str(original_root), input_size=(32, 16), cache_dir="", progress=False
    )
    data = load_attribute_data(cfg, tmp_path)
    assert cfg.layout == "original"
    assert len(data.train) + len(data.val) == 8 * 6  # bounding_box_train only
    assert data.train_labels.shape == (len(data.train), 12)
