"""``reid-serve reembed``: re-embed the gallery's outdated entries with the configured bundles, then exit.

It reads the same ``REID_*`` settings as the service, so it works on the database a service uses and
with the bundles that service loads; the service picks the rows up as they are committed
(``Gallery.sync_index``). Safe to interrupt at any moment and to run again (``app.gallery.reembed``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from app.bundle import BundleError
from app.gallery import store
from app.gallery.gallery import Gallery
from app.gallery.reembed import ReembedProgress, reembed
from app.inference import Models
from app.settings import settings_or_exit

BAR_WIDTH = 30


class ProgressBar:
    """One line on stderr: redrawn in place on a terminal, printed every few seconds otherwise (logs)."""

    def __init__(self, stream: TextIO, every: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._last = 0.0

    def __call__(self, progress: ReembedProgress) -> None:
        now = time.monotonic()
        final = progress.state != "running"
        if not (self.tty or final or now - self._last >= self.every):
            return
        self._last = now
        total = max(progress.total, 1)
        done = min(progress.processed, total)
        filled = BAR_WIDTH * done // total
        rate = progress.crops_per_second
        left = progress.total - progress.processed
        eta = f", {left / rate:.0f} s left" if rate > 0 and not final else ""
        line = (
            f"reembed [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {progress.processed}/{progress.total}"
            f" ({100 * done / total:.0f}%), {rate:.0f} crops/s{eta}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def summary(progress: ReembedProgress, models: Models) -> str:
    """What the run did, in one line, and what is left for a person to do."""
    text = (
        f"reembed: {progress.state}: {progress.reembedded} of {progress.total} outdated entries written "
        f"with {models.reid.name} {models.reid.version} and {models.attributes.name} "
        f"{models.attributes.version} in {progress.seconds:.1f} s ({progress.crops_per_second:.0f} crops/s, "
        f"batches of {progress.batch_size}); {progress.without_image} without a stored crop, "
        f"{progress.failed} with an unreadable crop, {progress.skipped} changed by another writer meanwhile"
    )
    if progress.without_image or progress.failed:
        text += (
            f". The {progress.without_image + progress.failed} left are kept but not searchable: enroll "
            "their crops again (the same bytes keep their entries)"
        )
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """The ``reid-serve reembed`` command."""
    parser = argparse.ArgumentParser(
        prog="reid-serve reembed",
        description="Re-embed, from their stored crops, the gallery entries made by another re-ID or "
        "attribute bundle than the configured ones (REID_* settings, as for the service), then exit. "
        "Resumable and safe while the service runs on the same database.",
    )
    parser.add_argument("--batch-size", type=int, help="crops per batch (default REID_REEMBED_BATCH_SIZE)")
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime threads per model (default REID_INTRA_OP_THREADS, else all cores); on cores "
        "that other jobs keep busy, 1 is faster (docs/service.md)",
    )
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit("reid-serve reembed")
    batch_size = args.batch_size or settings.reembed_batch_size
    if batch_size < 1:
        sys.exit("reid-serve reembed: --batch-size must be at least 1")
    if args.threads is not None and args.threads < 1:
        sys.exit("reid-serve reembed: --threads must be at least 1")

    from app.main import BUNDLE_HELP, preflight  # the service's own start-up checks

    problem = preflight(settings)
    if problem:
        sys.exit(f"reid-serve reembed: {problem}")
    try:
        models = Models.load(
            settings.attribute_bundle_dir,
            settings.reid_bundle_dir,
            batch_size=batch_size,
            device=settings.device,
            runtime=settings.runtime,
            threads=args.threads or settings.resolved_threads("onnx"),
        )
    except BundleError as exc:
        sys.exit(f"reid-serve reembed: {' '.join(str(exc).split())}; {BUNDLE_HELP}")
    engine = store.open_engine(settings.database)
    store.prepare_schema(engine)  # an older database is migrated, as the service would
    gallery = Gallery(engine, models)  # no index: the service keeps its own

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # finish the batch in flight, then stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        progress = reembed(
            gallery,
            batch_size=batch_size,
            max_pixels=settings.max_pixels,
            update_index=False,
            on_batch=ProgressBar(sys.stderr),
            stop=stop,
        )
    except Exception as exc:
        sys.exit(f"reid-serve reembed: failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
    finally:
        gallery.close()
    print(summary(progress, models))
    if progress.state == "stopped":
        sys.exit(130)
