"""The HTTP service: ``create_app(settings)`` and the ``reid-serve`` command.

Models are loaded and the gallery index is built in the lifespan, never at import.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import console
from app.api import build_router, problems, reid
from app.bundle import BundleError
from app.gallery.gallery import Gallery
from app.gallery.milvus_index import MISSING as MILVUS_MISSING
from app.gallery.milvus_index import is_server_uri
from app.gallery.reembed import ReembedJob
from app.gallery.store import SchemaError, open_engine, stored_schema_version
from app.inference import AttributeModel, Models, check_bundle
from app.metrics import ServiceMetrics
from app.runtimes import TORCH_MISSING, choose_runtime, torch_available, verify_files
from app.security import key_digests
from app.settings import Settings, settings_or_exit

log = logging.getLogger("app")

BUNDLE_HELP = (
    "train and export bundles with `reid-train` (see README), or point REID_MODELS_DIR, "
    "REID_ATTRIBUTE_BUNDLE or REID_REID_BUNDLE at existing bundle directories"
)

DESCRIPTION = """Pedestrian attributes, a gallery of enrolled crops and re-identification queries.

Images are sent as multipart files. Every error is RFC 9457 problem details
(`application/problem+json`): `type`, `title`, `status`, `instance`, a `detail` sentence naming the
problem and, for validation errors (422), the per-field `errors`.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not settings.api_keys:
        log.warning("REID_API_KEYS is not set: the API is open to anyone who can reach it")
    async with _open_service(app, settings):
        yield


@contextmanager
def _torch_threads(settings: Settings, models: Models) -> Iterator[None]:
    """torch's thread count is process-wide: set it for the service's life and restore it after (tests
    run several apps in one process). ONNX Runtime's is per session, FAISS's per call (GalleryIndex)."""
    if "torch" not in models.runtimes:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(settings.resolved_threads("torch"))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def load_models(settings: Settings) -> Models:
    """Both bundles, loaded and checked as ``settings`` say (``BundleError`` says why one cannot be)."""
    return Models.load(
        settings.attribute_bundle_dir,
        settings.reid_bundle_dir,
        batch_size=settings.batch_size,
        device=settings.device,
        runtime=settings.runtime,
        threads=settings.resolved_threads("onnx"),  # ONNX Runtime's; torch's is set in the lifespan
    )


@asynccontextmanager
async def _open_service(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    metrics: ServiceMetrics = app.state.metrics
    models: Models | None = app.state.loaded_models
    if models is None:
        models = await run_in_threadpool(load_models, settings)
    models.observe(metrics.observe_inference)
    metrics.describe_models(models)
    gallery = await run_in_threadpool(
        partial(
            Gallery.open,
            settings.database,
            models,
            metrics=metrics,
            search_threads=settings.faiss_threads,
            query_expansion=settings.query_expansion,
            gallery_side=settings.gallery_side,
            store_images=settings.store_images,
            snapshot_dir=settings.snapshot_dir,
            exact_max=settings.exact_search_max,
            snapshot_seconds=settings.snapshot_seconds,
            change_log_days=settings.change_log_days,
            vector_backend=settings.vector_backend,
            milvus_uri=settings.milvus,
            milvus_token=settings.milvus_token.get_secret_value() if settings.milvus_token else None,
        )
    )
    job = ReembedJob(gallery, batch_size=settings.reembed_batch_size, max_pixels=settings.max_pixels)
    app.state.inference_limiter = anyio.CapacityLimiter(settings.inference_workers)
    app.state.models = models
    app.state.gallery = gallery
    app.state.reembed_job = job
    metrics.track_gallery(lambda: len(gallery.index))
    metrics.track_reembed(job)
    log.info(
        "ready: attributes %s (%s) on %s, re-ID %s (%s) on %s, %d searchable entries, %d threads per model",
        models.attributes.name,
        models.attributes.version,
        models.attributes.runtime.name,
        models.reid.name,
        models.reid.version,
        models.reid.runtime.name,
        len(gallery.index),
        settings.resolved_threads(models.reid.runtime.name),
    )
    try:
        with _torch_threads(settings, models):
            async with anyio.create_task_group() as tasks:
                if settings.index_sync_seconds > 0:
                    tasks.start_soon(_keep_index_in_sync, gallery, settings.index_sync_seconds)
                yield
                tasks.cancel_scope.cancel()
    finally:
        app.state.models = None
        app.state.gallery = None
        app.state.reembed_job = None
        await run_in_threadpool(job.stop)
        gallery.close()


async def _keep_index_in_sync(gallery: Gallery, seconds: float) -> None:
    """Pick up rows that another process wrote (``reid-serve reembed`` on the same database)."""
    while True:
        await anyio.sleep(seconds)
        try:
            await run_in_threadpool(gallery.sync_index)
        except SQLAlchemyError as exc:  # the database away for a moment: try again next time
            log.warning("index sync with the database failed: %s", exc)
        except Exception:  # never let the poll take the service down with it
            log.exception("index sync failed")


class BodySizeLimit:
    """Answer 413 to a request body over ``max_bytes``, by Content-Length or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, send: Send) -> None:
        detail = f"request body is larger than the limit of {self.max_bytes} bytes"
        body = json.dumps(problems.problem_body(413, detail, instance=scope["path"]))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", problems.MEDIA_TYPE.encode()), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app answers after the limit tripped is replaced by the 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(scope, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, send)


class _BodyTooLarge(Exception):
    pass


class RequestMetrics:
    """Count and time every request by route template (not raw path, to bound label values)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The template without convertors (/gallery/{entry_id}, as the document names it).
            route = getattr(scope.get("route"), "path_format", "<unmatched>")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, *, models: Models | None = None) -> FastAPI:
    """Build the app; the lifespan loads the models, unless ``models`` (loaded with ``load_models``) are
    given, and opens the gallery."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    # FastAPIOffline: /docs (Swagger UI) and /redoc load their scripts from the package's copies under
    # /static-offline-docs instead of a CDN, so the docs work on networks without internet access.
    app = FastAPIOffline(
        title="Person re-identification service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_key_digests = key_digests(settings.key_bytes())
    app.state.loaded_models = models
    app.state.models = None
    app.state.gallery = None
    # The document is made at its first request; by then the service has loaded its models.
    finish = [
        partial(reid.document_top_k_limit, max_top_k=settings.max_top_k),
        lambda document: reid.document_attribute_filters(document, _attribute_model(app)),
    ]
    problems.install(app, finish=finish)
    app.include_router(build_router(api_keys=bool(settings.api_keys)))
    console.mount(app)  # /ui: the web console (open like /docs; its script sends the key)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every answer, 413s included
    return app


def _attribute_model(app: FastAPI) -> AttributeModel | None:
    models = app.state.models or app.state.loaded_models
    return models.attributes if models is not None else None


def preflight(settings: Settings) -> str | None:
    """A one-line reason the service cannot start (bundles, database), or None."""
    runtimes: set[str] = set()
    for directory, task in (
        (settings.attribute_bundle_dir, "attributes"),
        (settings.reid_bundle_dir, "reid"),
    ):
        try:
            manifest = check_bundle(directory, task)
            runtime = choose_runtime(manifest, settings.runtime, settings.device)
            if runtime == "torch" and not torch_available():
                return f"the {task} bundle at {directory} {TORCH_MISSING}"
            verify_files(directory, manifest, runtime)
        except BundleError as exc:
            return f"{_one_line(str(exc))}; {BUNDLE_HELP}"
        runtimes.add(runtime)
    if "torch" in runtimes and settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"REID_DEVICE is {settings.device} but torch sees no CUDA device; use REID_DEVICE=cpu"
    if settings.vector_backend == "milvus":
        needed = ["pymilvus"] + ([] if is_server_uri(settings.milvus) else ["milvus_lite"])
        if any(importlib.util.find_spec(name) is None for name in needed):
            return MILVUS_MISSING
    try:
        where = make_url(settings.database).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "REID_DATABASE_URL is not a database URL (e.g. postgresql+psycopg://user:pass@host/db)"
    try:
        engine = open_engine(settings.database)
        try:
            with engine.connect() as conn:
                # Read only: creating or migrating the schema is the start's job; this refuses what no
                # start could use, which the lifespan would report as a traceback.
                stored_schema_version(conn)
        finally:
            engine.dispose()
    except SchemaError as exc:
        return f"the database {where} cannot be used: {exc}"
    except (SQLAlchemyError, OSError, ImportError) as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"cannot open the database {where}: {reason}"
    return None


def serve(argv: Sequence[str] | None = None) -> None:
    """The ``reid-serve`` command; ``reid-serve reembed`` runs ``app.reembed_command`` instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reembed"]:
        from app.reembed_command import main as reembed

        reembed(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="reid-serve",
        description="Run the re-ID HTTP service.",
        epilog="`reid-serve reembed` re-embeds the gallery after a bundle change (--help for more).",
    )
    parser.add_argument("--host", help="address to bind (default REID_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default REID_PORT or 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit("reid-serve")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    problem = preflight(settings)
    if problem:
        sys.exit(f"reid-serve: {problem}")
    # Loaded here rather than in the lifespan: a bundle that passes the file checks and still cannot run
    # (weights that do not fit its architecture, a schema or embedding size its network contradicts)
    # stops the command with one line, where the server would report it as a traceback.
    try:
        models = load_models(settings)
    except BundleError as exc:
        sys.exit(f"reid-serve: {_one_line(str(exc))}; {BUNDLE_HELP}")

    import uvicorn

    app = create_app(settings, models=models)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)


def _one_line(text: str) -> str:
    """``text`` with its line breaks and indentation folded into single spaces (pydantic's and torch's
    messages span lines; a start-up error is one line)."""
    return " ".join(text.split())


if __name__ == "__main__":
    serve()
