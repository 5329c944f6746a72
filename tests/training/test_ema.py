"""The weight average: its arithmetic, the swap in and out, and the Trainer keeping it as the best epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.training.test_engine import ToyTask, config, strip_timing
from training.ema import WeightAverage
from training.engine import BEST, LAST, Trainer, load_checkpoint


def test_update_is_a_ramped_moving_average():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightAverage(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # first step: decay min(0.9, 1/10) = 0.1, so the average mostly follows the model
    assert torch.allclose(ema.state["0.weight"], 0.1 * start + 0.9 * (start + 1.0))
    assert int(ema.state["1.num_batches_tracked"]) == 7  # integer buffers are copied, not averaged
    ema.updates = 1000
    before = ema.state["0.weight"].clone()
    ema.update(model)  # later steps use the full decay
    assert torch.allclose(ema.state["0.weight"], 0.9 * before + 0.1 * (start + 1.0))


def test_applied_swaps_in_the_average_and_restores_the_raw_weights():
    model = nn.Linear(3, 1)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(-1.0)
    raw = model.weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model.weight, ema.state["weight"])
        assert not torch.equal(model.weight, raw)
    assert torch.equal(model.weight, raw)


def test_rejects_a_decay_outside_the_unit_interval():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(1, 1), decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        config(None, ema_decay=1.5)


def test_trainer_validates_and_keeps_the_average(tmp_path):
    Trainer(config(tmp_path / "one", epochs=1, ema_decay=0.9)).fit(ToyTask())
    last, best = load_checkpoint(tmp_path / "one" / LAST), load_checkpoint(tmp_path / "one" / BEST)
    averaged = last["ema"]["state"]
    assert last["ema"]["updates"] == 4  # one epoch of four batches
    for key, value in best["model"].items():  # the best checkpoint is the average, not the raw weights
        assert torch.equal(value, averaged[key])
    assert any(not torch.equal(last["model"][k], averaged[k]) for k in averaged)
    # Training still learns with the average validated: the last epoch beats the first.
    result = Trainer(config(tmp_path / "four", ema_decay=0.9)).fit(ToyTask())
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_resume_with_the_average_is_exact(tmp_path):
    torch.manual_seed(0)
    straight = Trainer(config(tmp_path / "a", ema_decay=0.8)).fit(ToyTask())
    torch.manual_seed(0)
    Trainer(config(tmp_path / "b", epochs=2, ema_decay=0.8)).fit(ToyTask())
    resumed = Trainer(config(tmp_path / "b", ema_decay=0.8)).fit(ToyTask(), resume=True)
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    a, b = load_checkpoint(tmp_path / "a" / LAST)["ema"], load_checkpoint(tmp_path / "b" / LAST)["ema"]
    assert a["updates"] == b["updates"]
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key])


def test_resume_without_a_kept_average_is_refused(tmp_path):
    Trainer(config(tmp_path, epochs=1)).fit(ToyTask())
    with pytest.raises(ValueError, match="weight average"):
        Trainer(config(tmp_path, epochs=2, ema_decay=0.9)).fit(ToyTask(), resume=True)
