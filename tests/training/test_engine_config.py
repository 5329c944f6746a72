"""Run configs: JSON round trip, validation, task check."""

from __future__ import annotations

import pytest

from training.config import AttributeTrainConfig, TrainConfig, read_task


def test_json_round_trip(tmp_path):
    cfg = AttributeTrainConfig(input_size=(128, 64), lr_steps=(10, 20), limit_ids=50, init_weights="imagenet")
    cfg.save(tmp_path / "config.json")
    back = AttributeTrainConfig.load(tmp_path / "config.json")
    assert back == cfg and back.input_size == (128, 64) and back.lr_steps == (10, 20)
    assert read_task(tmp_path / "config.json") == "attributes"


def test_report_defaults():
    cfg = AttributeTrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.patience) == (1e-4, 5e-4, 128, 100, 5)
    assert (cfg.monitor, cfg.monitor_mode, cfg.dropout, cfg.input_size) == (
        "val_loss",
        "min",
        0.2,
        (256, 128),
    )


def test_rejects_bad_values():
    with pytest.raises(ValueError, match="monitor_mode"):
        AttributeTrainConfig(monitor_mode="up")
    with pytest.raises(ValueError, match="unknown config keys"):
        AttributeTrainConfig.from_dict({"task": "attributes", "lerning_rate": 1})
    with pytest.raises(ValueError, match="task"):
        AttributeTrainConfig.from_dict({"task": "reid"})
    with pytest.raises(ValueError, match="class_weights"):
        AttributeTrainConfig(class_weights="inverse")


def test_subclass_pattern():
    """How a task adds its own config (the re-ID task does this)."""
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass
    class OtherConfig(TrainConfig):
        TASK: ClassVar[str] = "other"
        margin: float = 0.3

    cfg = OtherConfig.from_dict(OtherConfig(margin=0.5).to_dict())
    assert cfg.margin == 0.5 and cfg.to_dict()["task"] == "other"
