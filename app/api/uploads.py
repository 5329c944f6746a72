"""Reading and checking uploaded images, and running CPU work off the event loop.

Only real images are accepted: the bytes are decoded with Pillow; the file name and content type the
client sends are ignored (and never used as a path).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, TypeVar

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


@dataclass(frozen=True)
class Upload:
    """One uploaded file, checked for size but not read: its bytes stay where the form parser spooled
    them (a temporary file past 1 MB) until a worker reads them."""

    label: str
    file: BinaryIO

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()


def _size(upload: UploadFile) -> int:
    if upload.size is not None:
        return upload.size
    position = upload.file.tell()
    upload.file.seek(0, io.SEEK_END)
    size = upload.file.tell()
    upload.file.seek(position)
    return size


async def read_images(
    uploads: Sequence[UploadFile], settings: Settings, *, field: str = "images", single: bool = False
) -> list[Upload]:
    """The uploads, with the count and per-file size limits enforced, not yet read into memory: the
    bytes are read by ``decode_images`` / ``decode_crops`` in a worker thread, so that at most
    ``inference_workers`` requests hold their images in memory at once however many are uploading."""
    if not uploads:
        raise HTTPException(422, f"no image: send one or more files in the multipart field {field!r}")
    if len(uploads) > settings.max_images_per_request:
        raise HTTPException(
            413, f"{len(uploads)} images in one request; the limit is {settings.max_images_per_request}"
        )
    checked = []
    for position, upload in enumerate(uploads):
        label = _label(field, None if single else position, upload)
        size = _size(upload)
        if size > settings.max_upload_bytes:
            raise HTTPException(413, f"{label}: larger than the limit of {settings.max_upload_bytes} bytes")
        if not size:
            raise HTTPException(422, f"{label}: empty file")
        checked.append(Upload(label, upload.file))
    return checked


def decode_images(uploads: Sequence[Upload], max_pixels: int) -> list[Image.Image]:
    """Read and decode every upload or fail on the first bad one: 413 over the pixel limit, 415 not an
    image. Runs in a worker thread."""
    return [_decode(upload.label, upload.read(), max_pixels) for upload in uploads]


def _decode(label: str, data: bytes, max_pixels: int) -> Image.Image:
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise HTTPException(413, f"{label}: {exc}") from None
    except ImageError as exc:
        raise HTTPException(415, f"{label}: {exc}") from None


def content_type(data: bytes) -> str:
    """The MIME type of image bytes that decoded, from their header (Pillow's format, not the client's
    claim), so the stored crop is served back as what it is."""
    with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
        if image.format == "MPO":  # a camera's multi-picture JPEG: browsers show it as a JPEG
            return "image/jpeg"
        return image.get_format_mimetype() or "application/octet-stream"


def decode_crops(uploads: Sequence[Upload], max_pixels: int) -> list[Crop]:
    """Read and decode every upload (as ``decode_images``) into crops that carry their bytes and
    content type. Runs in a worker thread."""
    crops = []
    for i, upload in enumerate(uploads):
        data = upload.read()
        image = _decode(upload.label, data, max_pixels)
        crops.append(
            Crop(
                index=i,
                sha256=hashlib.sha256(data).hexdigest(),
                image=image,
                data=data,
                content_type=content_type(data),
            )
        )
    return crops


async def offload(request: Request, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` in a worker thread, at most ``inference_workers`` at a time, so the event loop
    (and /healthz) stays responsive while models run."""
    limiter = request.app.state.inference_limiter
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=limiter)
