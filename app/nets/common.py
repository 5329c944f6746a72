"""Pieces both networks share: the input normalisation that travels with the weights, stripe bins."""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Map uint8 [0, 255] or float [0, 1] images to the backbone's normalised input.

    Mean and std are buffers, so an exported bundle normalises exactly as training did. The caller's
    tensor is never modified in place.
    """

    def __init__(
        self,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255.0)
        return (x - self.mean) / self.std


def stripe_bins(height: int, stripes: int) -> list[tuple[int, int]]:
    """Row ranges of ``stripes`` horizontal stripes over ``height`` rows (adaptive pooling's bins)."""
    if not 0 < stripes <= height:
        raise ValueError(f"cannot pool {stripes} stripes from a map {height} rows tall")
    return [((i * height) // stripes, -(-(i + 1) * height // stripes)) for i in range(stripes)]
