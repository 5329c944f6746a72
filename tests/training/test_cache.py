"""The uint8 image cache: same pixels as the service's decoder, persisted, keyed by data and size."""

from __future__ import annotations

import shutil

import pytest
import torch

from app.preprocess import ImageError, load_image_file
from training.data.cache import cache_key, cached_images
from training.data.market import load_market


def test_decode_once_and_reuse(course_root, tmp_path):
    paths = [s.path for s in load_market(course_root).train[:10]]
    cache = tmp_path / "cache"
    images = cached_images(paths, (32, 16), cache, progress=False)
    assert images.shape == (10, 3, 32, 16) and images.dtype == torch.uint8
    assert torch.equal(images[3], torch.from_numpy(load_image_file(paths[3], (32, 16))))
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and "32x16" in files[0].name
    again = cached_images(paths, (32, 16), cache, progress=False)
    assert torch.equal(again, images)
    cached_images(paths, (64, 32), cache, progress=False)
    assert len(list(cache.glob("*.npy"))) == 2


def test_key_follows_content(course_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(course_root, root)
    paths = sorted((root / "train").glob("*.jpg"))[:5]
    key = cache_key(paths, (32, 16))
    assert cache_key(paths, (64, 32)) != key
    assert cache_key(paths[::-1], (32, 16)) != key
    paths[0].write_bytes(paths[0].read_bytes() + b"\0")
    assert cache_key(paths, (32, 16)) != key


def test_unreadable_image_names_the_file(course_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(course_root, root)
    bad = root / "train" / "0001_c1_000000000.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match=r"0001_c1_000000000\.jpg"):
        cached_images([bad], (32, 16), None, progress=False)
