"""Batched augmentation in torch: horizontal flip, pad-and-crop, random erasing.

Works on a whole uint8 (B, 3, H, W) batch at once, on whatever device the batch is on, and returns float
images in [0, 1] in channels-last memory format (the networks normalise inside). Nothing changes hue or
saturation: colours are labels. Randomness comes from torch's global generator (or one passed in), whose
state the trainer saves with every checkpoint, so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from app.nets.common import IMAGENET_MEAN


@dataclass
class BatchAugment:
    """Flip with probability ``flip_p``; zero-pad by ``pad`` and crop back at a random offset; erase
    one random rectangle (``erase_area`` of the image, aspect ``erase_ratio``) with probability
    ``erase_p``, filled with the ImageNet mean (zero after normalisation)."""

    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    channels_last: bool = True

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(images.shape)}")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        if self.flip_p > 0:
            x = self._flip(x, generator)
        if self.pad > 0:
            x = self._pad_crop(x, generator)
        if self.erase_p > 0:
            x = self._erase(x, generator)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _rand(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        return torch.rand(n, generator=generator, device="cpu").to(device)

    def _flip(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        flip = (self._rand(len(x), x.device, g) < self.flip_p).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)

    def _pad_crop(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = (self._rand(b, x.device, g) * (2 * p + 1)).long().clamp_max(2 * p)
        dx = (self._rand(b, x.device, g) * (2 * p + 1)).long().clamp_max(2 * p)
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        channel = torch.arange(3, device=x.device).view(1, 3, 1, 1)
        return padded[batch, channel, rows, cols]

    def _erase(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        u = self._rand(4 * b, x.device, g).view(4, b)
        lo, hi = self.erase_area
        area = (lo + (hi - lo) * u[0]) * h * w
        log_lo, log_hi = math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        eh = torch.sqrt(area * ratio).round().clamp(1, h)
        ew = torch.sqrt(area / ratio).round().clamp(1, w)
        top = ((h - eh + 1) * u[2]).floor().clamp_max(h - eh)
        left = ((w - ew + 1) * u[3]).floor().clamp_max(w - ew)
        apply = self._rand(b, x.device, g) < self.erase_p
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        box = (
            (ys >= top.view(b, 1, 1))
            & (ys < (top + eh).view(b, 1, 1))
            & (xs >= left.view(b, 1, 1))
            & (xs < (left + ew).view(b, 1, 1))
            & apply.view(b, 1, 1)
        )
        fill = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return torch.where(box.unsqueeze(1), fill, x)


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """An un-augmented uint8 batch moved to ``device`` (evaluation); the network normalises it."""
    x = images.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
