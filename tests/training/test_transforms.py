"""Batched augmentation: shapes, value range, channels-last, no colour change, determinism."""

from __future__ import annotations

import torch

from training.data.transforms import BatchAugment


def batch(b: int = 6, h: int = 32, w: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)


def test_output_format():
    x = batch()
    out = BatchAugment()(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert x.dtype == torch.uint8  # the caller's tensor is untouched


def test_identity_when_disabled():
    x = batch()
    out = BatchAugment(flip_p=0, pad=0, erase_p=0)(x)
    torch.testing.assert_close(out, x.float() / 255)


def test_flip_always():
    x = batch()
    out = BatchAugment(flip_p=1.0, pad=0, erase_p=0)(x)
    torch.testing.assert_close(out, x.flip(3).float() / 255)


def test_pad_crop_is_a_shift():
    x = torch.zeros(4, 3, 16, 8, dtype=torch.uint8)
    x[:, :, 8, 4] = 255  # one bright pixel per image
    out = BatchAugment(flip_p=0, pad=2, erase_p=0)(x)
    assert (out.sum(dim=(1, 2, 3)) == 3.0).all()  # still one pixel (3 channels), maybe moved


def test_erasing_fills_with_mean_and_keeps_pixel_colours():
    x = torch.full((8, 3, 32, 16), 255, dtype=torch.uint8)
    out = BatchAugment(flip_p=0, pad=0, erase_p=1.0)(x)
    changed = (out != 1.0).any(1)
    assert changed.flatten(1).any(1).all()  # every image got a box
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1)
    assert torch.allclose(out.permute(1, 0, 2, 3)[:, changed], mean.expand(3, int(changed.sum())))


def test_deterministic_with_generator():
    x = batch()
    a = BatchAugment()(x, torch.Generator().manual_seed(3))
    b = BatchAugment()(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
