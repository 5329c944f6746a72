"""Decode every image once into a uint8 (N, 3, H, W) tensor, kept on disk for the next run.

On 2 CPU cores, JPEG decoding and resizing every epoch would cost more than the network; decoding once
and augmenting whole batches in torch does not. Pixels come from ``app.preprocess.load_image_file``, the
function the service uses, so training sees exactly the service's input.

The cache file is ``<cache_dir>/images-<key>-<H>x<W>.npy``, where the key hashes the ordered relative
names and sizes of the images (the same recipe as the data fingerprint) and the size, so changed data
or another input size gets a new file. Rows follow the order of the sample list.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.preprocess import load_image_file


def cache_key(paths: Sequence[Path], size: tuple[int, int]) -> str:
    """Hash of the ordered file names (relative to their common folder), sizes and the target size."""
    digest = hashlib.sha256(f"{size[0]}x{size[1]}\n".encode())
    root = Path(os.path.commonpath([str(p) for p in paths])) if paths else Path()
    for path in paths:
        name = path.relative_to(root).as_posix() if path != root else path.name
        digest.update(f"{name}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:20]


def decode_images(
    paths: Sequence[Path],
    size: tuple[int, int],
    *,
    workers: int = 2,
    progress: bool = True,
    desc: str = "decode",
) -> torch.Tensor:
    """Decode and resize ``paths`` into one uint8 (N, 3, H, W) tensor (threads release the GIL)."""
    out = torch.empty((len(paths), 3, *size), dtype=torch.uint8)

    def load(i: int) -> None:
        out[i] = torch.from_numpy(load_image_file(paths[i], size))

    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        for _ in pool.map(load, range(len(paths)), chunksize=1):
            bar.update()
    return out


def cached_images(
    paths: Sequence[Path],
    size: tuple[int, int],
    cache_dir: str | Path | None,
    *,
    workers: int = 2,
    progress: bool = True,
) -> torch.Tensor:
    """The images of ``paths`` as uint8 (N, 3, H, W): read from the cache, or decoded and saved there."""
    paths = [Path(p) for p in paths]
    if cache_dir is None:
        return decode_images(paths, size, workers=workers, progress=progress)
    cache_dir = Path(cache_dir)
    file = cache_dir / f"images-{cache_key(paths, size)}-{size[0]}x{size[1]}.npy"
    if file.is_file():
        array = np.load(file)
        if array.shape == (len(paths), 3, *size) and array.dtype == np.uint8:
            return torch.from_numpy(array)
    images = decode_images(paths, size, workers=workers, progress=progress, desc=f"cache {file.name}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, images.numpy())
    tmp.replace(file)  # atomic: a crashed run never leaves half a cache behind
    return images
