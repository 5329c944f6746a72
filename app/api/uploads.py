"""Reading and checking uploaded images, and running CPU work off the event loop.

Only real images are accepted: the bytes are decoded with Pillow; the file name and content type the
client sends are ignored (and never used as a path).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import anyio.to_thread
from fastapi import HTTPException, Request, UploadFile
from PIL import Image

from app.gallery.gallery import Crop
from app.preprocess import ImageError, ImageTooLargeError, decode_image
from app.settings import Settings

T = TypeVar("T")


def _label(field: str, position: int | None, upload: UploadFile) -> str:
    where = field if position is None else f"{field}[{position}]"
    name = (upload.filename or "")[:80]
    return f"{where} {name!r}" if name else where


async def read_images(
    uploads: Sequence[UploadFile], settings: Settings, *, field: str = "images", single: bool = False
) -> list[tuple[str, bytes]]:
    """(label, bytes) per upload, enforcing the count and per-file size limits."""
    if not uploads:
        raise HTTPException(422, f"no image: send one or more files in the multipart field {field!r}")
    if len(uploads) > settings.max_images_per_request:
        raise HTTPException(
            413, f"{len(uploads)} images in one request; the limit is {settings.max_images_per_request}"
        )
    blobs = []
    for position, upload in enumerate(uploads):
        label = _label(field, None if single else position, upload)
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"{label}: larger than the limit of {settings.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, f"{label}: empty file")
        blobs.append((label, data))
    return blobs


def decode_images(blobs: Sequence[tuple[str, bytes]], max_pixels: int) -> list[Image.Image]:
    """Decode every upload or fail on the first bad one: 413 over the pixel limit, 415 not an image."""
    images = []
    for label, data in blobs:
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
        except ImageTooLargeError as exc:
            raise HTTPException(413, f"{label}: {exc}") from None
        except ImageError as exc:
            raise HTTPException(415, f"{label}: {exc}") from None
    return images


def content_type(data: bytes) -> str:
    """The MIME type of image bytes that decoded, from their header (Pillow's format, not the client's
    claim), so the stored crop is served back as what it is."""
    with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
        if image.format == "MPO":  # a camera's multi-picture JPEG: browsers show it as a JPEG
            return "image/jpeg"
        return image.get_format_mimetype() or "application/octet-stream"


def decode_crops(blobs: Sequence[tuple[str, bytes]], max_pixels: int) -> list[Crop]:
    """Decode every upload (as ``decode_images``) into crops that carry their bytes and content type."""
    images = decode_images(blobs, max_pixels)
    return [
        Crop(
            index=i,
            sha256=hashlib.sha256(data).hexdigest(),
            image=img,
            data=data,
            content_type=content_type(data),
        )
        for i, ((_, data), img) in enumerate(zip(blobs, images, strict=True))
    ]


async def offload(request: Request, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` in a worker thread, at most ``inference_workers`` at a time, so the event loop
    (and /healthz) stays responsive while models run."""
    limiter = request.app.state.inference_limiter
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=limiter)
