"""The Trainer: run directory, exact resume, early stopping, lr schedule, device selection."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training.config import AttributeTrainConfig
from training.engine import (
    BEST,
    LAST,
    LrSchedule,
    RunExistsError,
    Task,
    Trainer,
    load_checkpoint,
    resolve_device,
    resolve_precision,
)


class ToyTask:
    """Regression with dropout and shuffling: enough randomness to catch an inexact resume."""

    name = "attributes"

    def __init__(self, seed: int = 0, flat: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.flat = flat
        self.seen_epochs: list[int] = []

    def train_batches(self, epoch: int):
        self.seen_epochs.append(epoch)
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 64, 16):
            idx = order[i : i + 16]
            yield self.x[idx], self.y[idx]

    def device(self):
        return next(self.model.parameters()).device

    def train_step(self, batch):
        x, y = (t.to(self.device()) for t in batch)
        loss = nn.functional.mse_loss(self.model(x + 0.01 * torch.randn_like(x)), y)
        return {"loss": loss, "mse": loss.detach()}

    def validate(self):
        x, y = self.x.to(self.device()), self.y.to(self.device())
        loss = nn.functional.mse_loss(self.model(x).float(), y).item()
        return {"val_loss": 1.0 if self.flat else loss, "score": -loss}


def config(tmp_path, **kw):
    base = dict(epochs=4, lr=1e-2, device="cpu", progress=False, run_dir=str(tmp_path), patience=0)
    return AttributeTrainConfig(**{**base, **kw})


def strip_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def test_run_directory(tmp_path):
    task = ToyTask()
    assert isinstance(task, Task)
    result = Trainer(config(tmp_path)).fit(task)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for name in ("config.json", "metrics.json", LAST, BEST):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task"] == "attributes" and saved["epochs"] == 4
    record = json.loads((tmp_path / "metrics.json").read_text())[0]
    assert {"train_loss", "train_mse", "val_loss", "score", "lr", "seconds", "images_per_s"} <= set(record)
    best = load_checkpoint(tmp_path / BEST)
    assert best["epoch"] == result.best_epoch and best["task"] == "attributes"
    assert best["metrics"]["val_loss"] == min(r["val_loss"] for r in result.history)


def test_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    straight = Trainer(config(tmp_path / "a")).fit(ToyTask())
    torch.manual_seed(0)
    Trainer(config(tmp_path / "b", epochs=2)).fit(ToyTask())
    torch.manual_seed(123)  # a different global state must not matter after resume
    task = ToyTask()
    resumed = Trainer(config(tmp_path / "b")).fit(task, resume=True)
    assert task.seen_epochs == [3, 4]
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    a, b = load_checkpoint(tmp_path / "a" / LAST), load_checkpoint(tmp_path / "b" / LAST)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])


def test_refuses_to_overwrite_a_run(tmp_path):
    Trainer(config(tmp_path, epochs=1)).fit(ToyTask())
    with pytest.raises(RunExistsError):
        Trainer(config(tmp_path, epochs=1)).fit(ToyTask())


def test_early_stopping(tmp_path):
    result = Trainer(config(tmp_path, epochs=10, patience=2)).fit(ToyTask(flat=True))
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    again = Trainer(config(tmp_path, epochs=10, patience=2)).fit(ToyTask(flat=True), resume=True)
    assert len(again.history) == 3  # a stopped run stays stopped


def test_monitor_max_mode(tmp_path):
    result = Trainer(config(tmp_path, monitor="score", monitor_mode="max")).fit(ToyTask())
    assert result.best_value == max(r["score"] for r in result.history)


def test_monitor_epoch_keeps_the_last_epoch(tmp_path):
    # Validation is still run and recorded, but the schedule's end is kept even when an earlier
    # epoch scored better (a flat loss: epoch 1 would win under val_loss), and nothing stops early.
    cfg = config(tmp_path, epochs=4, monitor="epoch", patience=2)
    assert (cfg.monitor_mode, cfg.patience) == ("max", 0)
    result = Trainer(cfg).fit(ToyTask(flat=True))
    assert not result.stopped_early and result.best_epoch == 4 and len(result.history) == 4
    assert load_checkpoint(tmp_path / BEST)["epoch"] == 4
    assert all("val_loss" in r for r in result.history)


def test_missing_monitor_key(tmp_path):
    with pytest.raises(KeyError, match="nope"):
        Trainer(config(tmp_path, monitor="nope")).fit(ToyTask())


def test_lr_schedule(tmp_path):
    schedule = LrSchedule(warmup_epochs=2, warmup_factor=0.1, steps=[3], gamma=0.5)
    assert [schedule(i) for i in range(4)] == pytest.approx([0.1, 0.55, 1.0, 0.5])
    result = Trainer(config(tmp_path, warmup_epochs=2, lr_steps=(3,), lr_gamma=0.5)).fit(ToyTask())
    assert [r["lr"] for r in result.history] == pytest.approx([1e-3, 5.5e-3, 1e-2, 5e-3])


def test_parameter_groups_lr_scale(tmp_path):
    task = ToyTask()
    task.parameter_groups = lambda: [
        {"params": task.model[0].parameters()},
        {"params": task.model[3].parameters(), "lr_scale": 10.0},
    ]
    trainer = Trainer(config(tmp_path, epochs=1))
    optimizer = trainer._optimizer(task)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-1])


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")


def test_precision_choice(monkeypatch):
    import training.engine as engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(True, cuda) == "fp16" and resolve_precision(False, cuda) == "fp32"
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    assert resolve_precision(True, cpu) == "bf16" and resolve_precision(False, cpu) == "fp32"
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)  # emulated bf16 would be slower
    assert resolve_precision(True, cpu) == "fp32"


def test_bf16_training_learns_and_is_recorded(tmp_path, monkeypatch):
    import training.engine as engine

    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)  # bf16 autocast runs on any CPU, slower
    trainer = Trainer(config(tmp_path, epochs=6))
    assert trainer.precision == "bf16" and trainer.autocast_dtype == torch.bfloat16
    task = ToyTask()
    with torch.no_grad():
        before = task.validate()["val_loss"]
    result = trainer.fit(task)
    assert result.history[-1]["val_loss"] < 0.5 * before
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["amp"] is True
    fp32 = Trainer(config(tmp_path / "fp32", amp=False))
    assert fp32.precision == "fp32" and not fp32.amp


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last(tmp_path):
    trainer = Trainer(config(tmp_path, device="cuda", epochs=1))
    assert trainer.amp and trainer.channels_last
    result = trainer.fit(ToyTask())
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
