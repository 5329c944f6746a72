"""Re-embedding: bring entries made by another re-ID or attribute bundle up to date from their stored crops.

Each batch is read, decoded and run through the models outside any lock, then written in one
transaction whose UPDATE only touches entries still as they were read (``store.write_reembedded``).
Hence a run is:

- resumable: a killed run loses at most its uncommitted batch, and the next run starts from the first
  entry still outdated; entries are updated in place, so nothing is ever duplicated;
- safe next to a running service or another run: whatever changed an entry since it was read wins;
- honest about what it cannot do: entries without a stored crop, or whose crop no longer decodes, are
  counted and left as they are (kept, reported, not searched), never dropped.

The service picks up rows written by another process through ``Gallery.sync_index``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from PIL import Image

from app.gallery import store
from app.gallery.gallery import Gallery
from app.inference import Models
from app.preprocess import ImageError, decode_image

log = logging.getLogger(__name__)

ReembedState = Literal["idle", "running", "done", "stopped", "failed"]


@dataclass
class ReembedProgress:
    """Where a run stands; the counts add up to ``total`` when it is done."""

    state: ReembedState = "idle"
    total: int = 0  # outdated entries when the run started
    reembedded: int = 0  # written with the loaded bundles
    without_image: int = 0  # no stored crop: left as they are
    failed: int = 0  # stored crop no longer decodes (e.g. over REID_MAX_PIXELS): left as they are
    skipped: int = 0  # changed by another writer meanwhile (deleted, re-enrolled): nothing to do
    batch_size: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    _started: float = field(default=0.0, repr=False)
    _elapsed: float = field(default=0.0, repr=False)

    @property
    def processed(self) -> int:
        return self.reembedded + self.without_image + self.failed + self.skipped

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._started if self.state == "running" else self._elapsed

    @property
    def crops_per_second(self) -> float:
        """Entries written per second of the run so far."""
        return self.reembedded / self.seconds if self.seconds > 0 else 0.0


# Called after every batch with the progress so far (the CLI's progress bar, the service's metrics).
ProgressHook = Callable[[ReembedProgress], None]


def reembed(
    gallery: Gallery,
    *,
    batch_size: int,
    max_pixels: int,
    update_index: bool = True,
    progress: ReembedProgress | None = None,
    on_batch: ProgressHook | None = None,
    stop: threading.Event | None = None,
) -> ReembedProgress:
    """Re-embed (and re-describe) every outdated entry of ``gallery`` with its loaded bundles.

    ``update_index``: add written entries to this process's index (the service's own run); a separate
    command has no index to keep. ``stop`` ends the run between batches (state ``stopped``).
    """
    progress = progress or ReembedProgress()
    models = gallery.models
    versions = {
        "model_version": models.reid.version,
        "attribute_model_version": models.attributes.version,
    }
    with gallery.sessions() as session:
        total, _ = store.count_outdated(session, **versions)
    progress.total, progress.batch_size = total, batch_size
    progress.started_at, progress.finished_at = datetime.now(UTC), None
    progress._started, progress.state = time.perf_counter(), "running"

    def read(after_id: int) -> list[_Read]:
        with gallery.sessions() as session:
            rows = store.outdated_rows(session, after_id=after_id, limit=batch_size, **versions)
        return [_prepare(row, models, max_pixels) for row in rows]

    # The next batch is read from the database, decoded and resized while this one runs through the
    # models (ONNX Runtime and Pillow both release the GIL).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reembed-read") as reader:
        try:
            pending: Future[list[_Read]] = reader.submit(read, 0)
            stopped = False
            while True:
                batch = pending.result()
                if not batch:
                    break
                pending = reader.submit(read, batch[-1].row.id)
                items = _compute(models, batch, progress)
                written = gallery.write_reembedded(items, update_index=update_index) if items else 0
                progress.reembedded += written
                progress.skipped += len(items) - written
                if on_batch is not None:
                    on_batch(progress)
                if stop is not None and stop.is_set():
                    stopped = True
                    break
            _finish(progress, "stopped" if stopped else "done")
        except Exception as exc:
            _finish(progress, "failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if on_batch is not None:
                on_batch(progress)
    return progress


def _finish(progress: ReembedProgress, state: ReembedState, error: str | None = None) -> None:
    # The times first: a reader that sees the final state also sees the run's final rate.
    progress._elapsed = time.perf_counter() - progress._started
    progress.finished_at = datetime.now(UTC)
    progress.error = error
    progress.state = state


@dataclass
class _Read:
    """An outdated row with its crop decoded: ``for_reid`` resized to the re-ID input if it needs a new
    embedding, ``for_attributes`` as decoded if it needs new attributes; ``error`` if it did not decode."""

    row: store.OutdatedRow
    for_reid: Image.Image | None = None
    for_attributes: Image.Image | None = None
    error: str | None = None


def _prepare(row: store.OutdatedRow, models: Models, max_pixels: int) -> _Read:
    if row.data is None:
        return _Read(row)
    try:
        image = decode_image(row.data, max_pixels=max_pixels)
    except ImageError as exc:
        return _Read(row, error=str(exc))
    read = _Read(row)
    if row.model_version != models.reid.version:
        # The resize the model would do (app.preprocess.image_to_array), done here off the model's
        # thread; the model's own resize to the same size then changes no pixel.
        height, width = models.reid.input_size
        read.for_reid = image.resize((width, height), Image.Resampling.BILINEAR)
    if row.attribute_model_version != models.attributes.version:
        read.for_attributes = image
    return read


def _compute(models: Models, batch: list[_Read], progress: ReembedProgress) -> list[store.Reembedded]:
    """New embeddings and attributes for the rows that have a readable crop; the rest are counted."""
    readable = []
    for read in batch:
        if read.row.data is None:
            progress.without_image += 1
        elif read.error is not None:
            log.warning("entry %d: stored crop not re-embedded: %s", read.row.id, read.error)
            progress.failed += 1
        else:
            readable.append(read)
    embed = [r for r in readable if r.for_reid is not None]
    describe = [r for r in readable if r.for_attributes is not None]
    # One forward pass per batch: the run's batch size, not the service's per-request one.
    size = len(batch)
    vectors = models.reid.embed([r.for_reid for r in embed], batch_size=size) if embed else []
    predicted = (
        models.attributes.predict([r.for_attributes for r in describe], batch_size=size) if describe else []
    )
    new_vectors = {r.row.id: vectors[i] for i, r in enumerate(embed)}
    new_attributes = {
        r.row.id: {name: (v.value, v.score) for name, v in predicted[i].items()}
        for i, r in enumerate(describe)
    }
    return [
        store.Reembedded(
            seen=r.row, embedding=new_vectors.get(r.row.id), attributes=new_attributes.get(r.row.id)
        )
        for r in readable
    ]


class ReembedJob:
    """The service's background run (``POST /admin/reembed``): one at a time, progress readable at any
    moment (``/gallery/stats``, ``/metrics``), stopped between batches when the service shuts down."""

    def __init__(
        self, gallery: Gallery, *, batch_size: int, max_pixels: int, on_batch: ProgressHook | None = None
    ) -> None:
        self.gallery = gallery
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.on_batch = on_batch
        self.progress = ReembedProgress(batch_size=batch_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Start a run in a background thread; False if one is already running."""
        with self._lock:
            if self.running:
                return False
            self.progress = ReembedProgress(state="running", batch_size=self.batch_size)
            self._thread = threading.Thread(target=self._run, name="reembed", daemon=True)
            self._thread.start()
            return True

    def _run(self) -> None:
        try:
            reembed(
                self.gallery,
                batch_size=self.batch_size,
                max_pixels=self.max_pixels,
                progress=self.progress,
                on_batch=self.on_batch,
                stop=self._stop,
            )
        except Exception:  # recorded in the progress (state failed, error); the service goes on
            log.exception("re-embedding failed")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> ReembedProgress:
        """Block until the current run ends (tests, the command line)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.progress
