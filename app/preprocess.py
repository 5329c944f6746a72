"""Image decoding and resizing shared by training's cache and the service, so both see the same pixels.

NumPy and Pillow only: the service runs without torch; training wraps the arrays with ``torch.from_numpy``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """Bytes that are not a usable image; the message says why."""


class ImageTooLargeError(ImageError):
    """An image over the pixel limit (or a decompression bomb); the service answers 413 for it."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes with Pillow, refusing non-images, truncated files and decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"image has {width}x{height} pixels, more than the limit of {max_pixels}"
                    )
                probe.verify()  # catches truncated and corrupt files before the full decode
            image = Image.open(io.BytesIO(data))
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError("image is too large (decompression bomb protection)") from None
    except Exception as exc:  # Pillow raises many types for bad input
        raise ImageError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    return image.convert("RGB")


def image_to_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width) with bilinear filtering; returns a uint8 (3, H, W) array."""
    height, width = size
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def images_to_batch(images: list[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """Stack resized crops into the networks' input: uint8 (N, 3, H, W), RGB."""
    batch = np.empty((len(images), 3, *size), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = image_to_array(image, size)
    return batch


def load_image_file(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read, decode and resize one image file; errors name the file."""
    path = Path(path)
    try:
        image = decode_image(path.read_bytes())
    except (OSError, ImageError) as exc:
        raise ImageError(f"{path}: {exc}") from None
    return image_to_array(image, size)
