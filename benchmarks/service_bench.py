"""Service benchmark (a script, not a test): the real HTTP service against in-process baselines.

Measures, on this machine:

- crops/s (crops per request / median request time) of ``POST /attributes`` and ``POST /gallery``
  at 1 and 32 crops per request, next to the model alone (decode + resize + forward in this process,
  no HTTP, no database);
- ``POST /reid/query`` latency p50/p99 at gallery sizes 10k and 100k (synthetic embeddings written
  straight into the database, then indexed by the server at start), without and with a camera filter,
  next to the index alone (FAISS search in this process) and the query crop's embedding alone.

The service runs as ``reid-serve`` in a subprocess over SQLite, reached over loopback with httpx.
Without ``--attribute-bundle/--reid-bundle`` it makes random-weight bundles of ``--backbone`` at
``--input-size`` (speed does not depend on the weights). Prints a markdown table.

    .venv/bin/python benchmarks/service_bench.py                       # random mobilenet_v2, 256x128
    .venv/bin/python benchmarks/service_bench.py --attribute-bundle models_store/attributes \\
        --reid-bundle models_store/reid
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.bundle import EmbeddingSpec, Manifest, read_manifest  # noqa: E402
from app.gallery import store  # noqa: E402
from app.gallery.index import GalleryIndex  # noqa: E402
from app.inference import Models  # noqa: E402
from app.nets.attributes import AttributeNet, AttributeNetConfig  # noqa: E402
from app.nets.bundles import save_bundle  # noqa: E402
from app.nets.reid import ReIDNet, ReIDNetConfig  # noqa: E402
from app.preprocess import decode_image  # noqa: E402
from app.schema import schema_as_dict  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.synthetic import make_identities, render  # noqa: E402

CAMERAS = 6


# -- bundles and crops --------------------------------------------------------------------------------


def make_random_bundles(root: Path, backbone: str, size: tuple[int, int], branch_dim: int | None):
    torch.manual_seed(0)
    a_cfg = AttributeNetConfig(backbone=backbone, input_size=size)
    r_cfg = ReIDNetConfig(backbone=backbone, input_size=size, branch_dim=branch_dim)
    common = {"backbone": backbone, "input_size": size, "mean": a_cfg.mean, "std": a_cfg.std}
    attributes, reid = AttributeNet(a_cfg).eval(), ReIDNet(r_cfg).eval()
    save_bundle(
        root / "attributes",
        attributes,
        Manifest(
            name=f"random-attributes-{backbone}",
            task="attributes",
            architecture=a_cfg.to_dict(),
            attribute_schema=schema_as_dict(),
            **common,
        ),
    )
    save_bundle(
        root / "reid",
        reid,
        Manifest(
            name=f"random-reid-{backbone}",
            task="reid",
            architecture=r_cfg.to_dict(),
            embedding=EmbeddingSpec(dim=reid.embedding_dim),
            match_threshold=0.5,
            **common,
        ),
    )
    return root / "attributes", root / "reid"


class Crops:
    """Distinct JPEG crops of synthetic people (distinct bytes, so enrollment never short-cuts)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.people = make_identities(64, seed=11)
        self.rng = np.random.default_rng(0)
        self.count = 0

    def take(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            person = self.people[self.count % len(self.people)]
            image = render(person, 1 + self.count % CAMERAS, self.rng, self.size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
            self.count += 1
        return out


# -- timing helpers -------------------------------------------------------------------------------------


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


def crops_per_second(run: Callable[[list[bytes]], object], crops: Crops, batch: int, requests: int) -> float:
    """``batch`` / the median request time: robust to bursts of load from other processes."""
    run(crops.take(batch))  # warm-up
    samples = []
    for _ in range(requests):
        blobs = crops.take(batch)
        start = time.perf_counter()
        run(blobs)
        samples.append(time.perf_counter() - start)
    return batch / statistics.median(samples)


def latencies(run: Callable[[], object], n: int) -> tuple[float, float]:
    run()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


# -- the server -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``reid-serve`` in a subprocess; ``start`` returns the seconds until /readyz said ok."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        started = time.perf_counter()
        self.log = (self.workdir / "server.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.main", "--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {self.workdir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None
            self.log.close()


def files(blobs: list[bytes], field: str = "images"):
    return [(field, (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


# -- synthetic gallery ------------------------------------------------------------------------------------


def top_up(url: str, target: int, *, model_version: str, dim: int, seed: int) -> None:
    """Insert random unit vectors until the database holds ``target`` entries."""
    engine = store.open_engine(url)
    store.prepare_schema(engine)
    rng = np.random.default_rng(seed)
    entries, embeddings = store.Entry.__table__, store.Embedding.__table__
    with engine.begin() as conn:
        have = conn.execute(select(func.count()).select_from(entries)).scalar_one()
        next_id = (conn.execute(select(func.max(entries.c.id))).scalar_one() or 0) + 1
    now = datetime.now(UTC).replace(tzinfo=None)
    for start in range(have, target, 5000):
        n = min(5000, target - start)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = range(next_id + start - have, next_id + start - have + n)
        rows = [
            {
                "id": entry_id,
                "collection": "default",
                "identity": f"synthetic-{entry_id // 4}",
                "camera_id": f"cam-{entry_id % CAMERAS}",
                "track_id": None,
                "captured_at": now,
                "metadata": {},
                "image_sha256": hashlib.sha256(f"synthetic-{entry_id}".encode()).hexdigest(),
                "model_version": model_version,
                "attribute_model_version": "synthetic",
                "created_at": now,
            }
            for entry_id in ids
        ]
        with engine.begin() as conn:
            conn.execute(entries.insert(), rows)
            conn.execute(
                embeddings.insert(),
                [{"entry_id": e, "vector": vectors[i].tobytes()} for i, e in enumerate(ids)],
            )
    engine.dispose()


def load_index(url: str, *, model_version: str, dim: int, threads: int) -> tuple[GalleryIndex, np.ndarray]:
    """The same index the server builds, in this process, and the ids of camera 'cam-1'."""
    engine = store.open_engine(url)
    index = GalleryIndex(dim, threads=threads)
    with Session(engine) as session:
        for ids, collections, vectors in store.iter_embeddings(session, model_version=model_version, dim=dim):
            index.add(ids, collections, vectors)
        camera = store.matching_ids(
            session,
            collection="default",
            model_version=model_version,
            filters=store.SearchFilters(cameras=("cam-1",)),
        )
    engine.dispose()
    return index, camera


# -- main -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attribute-bundle", type=Path)
    parser.add_argument("--reid-bundle", type=Path)
    parser.add_argument("--backbone", default="mobilenet_v2", help="for the random bundles")
    parser.add_argument("--input-size", default="256x128", help="HEIGHTxWIDTH, for the random bundles")
    parser.add_argument("--branch-dim", type=int, default=None, help="for the random re-ID bundle")
    parser.add_argument(
        "--threads", type=int, help="torch threads, here and in the server (default: the service's choice)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100, help="timed queries per gallery size")
    parser.add_argument(
        "--requests", type=int, nargs=2, default=[24, 3], help="timed requests at 1 and 32 crops"
    )
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="reid-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "data", ignore_errors=True)  # every run starts from an empty gallery
    if (args.attribute_bundle is None) != (args.reid_bundle is None):
        parser.error("give both --attribute-bundle and --reid-bundle, or neither")
    if args.attribute_bundle is None:
        h, w = (int(v) for v in args.input_size.lower().split("x"))
        attribute_dir, reid_dir = make_random_bundles(
            workdir / "bundles", args.backbone, (h, w), args.branch_dim
        )
        origin = "random weights"
    else:
        attribute_dir, reid_dir = args.attribute_bundle, args.reid_bundle
        origin = "given bundles"
    reid_manifest = read_manifest(reid_dir)
    attr_manifest = read_manifest(attribute_dir)
    dim = reid_manifest.embedding.dim
    settings = Settings(intra_op_threads=args.threads or 0)
    threads = settings.resolved_threads()
    torch.set_num_threads(threads)
    url = f"sqlite:///{workdir / 'data' / 'gallery.sqlite3'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")} | {
        "REID_ATTRIBUTE_BUNDLE": str(attribute_dir.resolve()),
        "REID_REID_BUNDLE": str(reid_dir.resolve()),
        "REID_DATA_DIR": str(workdir / "data"),
        "REID_TORCH_THREADS": str(threads),
        "REID_BATCH_SIZE": str(settings.batch_size),
    }
    rows: list[tuple[str, str, str]] = []  # (what, service, baseline)

    began = time.perf_counter()

    def say(text: object) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {text}", file=sys.stderr, flush=True)

    say(f"load average at the start: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")

    # Baselines: the models alone.
    models = Models.load(attribute_dir, reid_dir, batch_size=settings.batch_size)
    crops = Crops(tuple(attr_manifest.input_size))

    def model_attributes(blobs):
        return models.attributes.predict([decode_image(b) for b in blobs])

    def model_enroll(blobs):
        images = [decode_image(b) for b in blobs]
        return models.attributes.predict(images), models.reid.embed(images)

    server = Server(env, workdir)
    server.start()
    say(f"server up at {server.url}")
    with httpx.Client(base_url=server.url, timeout=600) as client:

        def http_attributes(blobs):
            response = client.post("/attributes", files=files(blobs))
            response.raise_for_status()

        def http_enroll(blobs):
            response = client.post("/gallery", files=files(blobs), data={"camera_id": "cam-bench"})
            assert response.status_code == 201, response.text

        for batch, requests in ((1, args.requests[0]), (32, args.requests[1])):
            for name, http, model in (
                ("POST /attributes", http_attributes, model_attributes),
                ("POST /gallery (enroll)", http_enroll, model_enroll),
            ):
                service = crops_per_second(http, crops, batch, requests)
                baseline = crops_per_second(model, crops, batch, requests)
                rows.append(
                    (
                        f"{name}, {batch} crop{'s' if batch > 1 else ''}/request",
                        f"{service:.1f} crops/s",
                        f"{baseline:.1f} crops/s (model only)",
                    )
                )
                say(rows[-1])
    server.stop()

    query_blob = crops.take(1)[0]
    query_image = decode_image(query_blob)
    embed_p50, embed_p99 = latencies(lambda: models.reid.embed([query_image]), args.queries)
    for size in sorted(args.sizes):
        say(f"filling the gallery to {size} entries")
        top_up(url, size, model_version=reid_manifest.version, dim=dim, seed=size)
        ready = server.start()
        with httpx.Client(base_url=server.url, timeout=600) as client:
            assert client.get("/gallery/stats").json()["searchable"] == size

            def http_query(data):
                def run():
                    response = client.post("/reid/query", files=files([query_blob], "image"), data=data)
                    response.raise_for_status()

                return run

            plain = latencies(http_query({"top_k": "10"}), args.queries)
            filtered = latencies(http_query({"top_k": "10", "camera_id": "cam-1"}), args.queries)
        server.stop()
        index, camera = load_index(
            url, model_version=reid_manifest.version, dim=dim, threads=settings.faiss_threads
        )
        vector = models.reid.embed([query_image])[0]
        index_plain = latencies(partial(index.search, "default", vector, 10), args.queries)
        index_filtered = latencies(partial(index.search, "default", vector, 10, allowed=camera), args.queries)
        del index

        def ms(p):
            return f"p50 {p[0] * 1000:.1f} ms / p99 {p[1] * 1000:.1f} ms"

        rows.append(
            (
                f"POST /reid/query, {size:,} entries, top 10",
                ms(plain),
                f"index {ms(index_plain)}; embedding {ms((embed_p50, embed_p99))}",
            )
        )
        rows.append(
            (
                f"POST /reid/query, {size:,} entries, top 10, 1 camera of {CAMERAS}",
                ms(filtered),
                f"index {ms(index_filtered)}",
            )
        )
        rows.append(
            (f"start-up with {size:,} entries (index rebuilt from SQLite)", f"{ready:.1f} s to ready", "")
        )
        say(rows[-3:])

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average at the end {load}; "
        f"torch {torch.__version__}, {threads} torch thread(s), {settings.faiss_threads} FAISS thread(s), "
        f"batch size {settings.batch_size}, in server and baseline alike (client, server and baseline "
        "share the cores)."
    )
    a, r = attr_manifest, reid_manifest
    print(
        f"Bundles ({origin}): attributes `{a.backbone}` {a.input_size[0]}x{a.input_size[1]}, "
        f"re-ID `{r.backbone}` {r.input_size[0]}x{r.input_size[1]} with {dim}-d embeddings. "
        "JPEG crops; SQLite; one reid-serve process reached over loopback HTTP."
    )
    print()
    print("| measurement | service (HTTP) | baseline in-process |")
    print("|---|---|---|")
    for what, service, baseline in rows:
        print(f"| {what} | {service} | {baseline} |")


if __name__ == "__main__":
    main()
