"""Flip test-time augmentation in ``predict-reid``: the embedding of a crop and of its mirror image agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from training.cli.reid_predict import embed_files


class _ToFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255  # bundles' networks take uint8 crops and normalise inside


def _mirror_sensitive_net() -> nn.Module:
    torch.manual_seed(0)
    # pooling to a left and a right half keeps the output sensitive to a horizontal flip
    return nn.Sequential(
        _ToFloat(), nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten()
    )


@pytest.fixture
def crop_and_mirror(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (32, 16, 3), dtype=np.uint8)
    paths = [tmp_path / "crop.png", tmp_path / "mirror.png"]
    Image.fromarray(pixels).save(paths[0])
    Image.fromarray(pixels[:, ::-1]).save(paths[1])
    return paths


def test_flip_makes_the_embedding_mirror_invariant(crop_and_mirror):
    kwargs = {"batch_size": 2, "workers": 1, "progress": False}
    plain = embed_files(_mirror_sensitive_net(), crop_and_mirror, (32, 16), **kwargs)
    flipped = embed_files(_mirror_sensitive_net(), crop_and_mirror, (32, 16), flip=True, **kwargs)
    assert torch.allclose(plain.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)
    assert torch.allclose(flipped[0], flipped[1], atol=1e-5)
    assert torch.allclose(flipped.norm(dim=1), torch.ones(2), atol=1e-5)
