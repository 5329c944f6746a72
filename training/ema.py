"""An exponential moving average of a model's weights, validated and kept in place of the raw ones.

The averaged weights (Polyak averaging; timm's ``ModelEmaV2`` does the same) cost nothing at inference:
the exported network is unchanged, only its weights are the running mean of the last ~1 / (1 - decay)
optimizer steps. BatchNorm running statistics are averaged like the weights; integer buffers are copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """EMA of ``model``'s state; ``update`` after each optimizer step, ``applied`` to validate with it."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay of the next update: ramped up so the first steps do not keep the initial weights."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current state into the average."""
        d = self.current_decay()
        self.updates += 1
        for key, value in model.state_dict().items():
            mine = self.state[key]
            if mine.dtype.is_floating_point:
                mine.mul_(d).add_(value.detach().to(mine.dtype), alpha=1.0 - d)
            else:
                mine.copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Run the block with the averaged weights loaded into ``model``; the raw ones are restored after."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(raw)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        self.decay, self.updates = float(data["decay"]), int(data["updates"])
        for key, value in data["state"].items():
            self.state[key].copy_(value)
