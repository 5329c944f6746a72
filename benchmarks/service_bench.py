"""Service benchmark (a script, not a test): ONNX Runtime against torch, in one run, model and service.

One run measures both runtimes side by side on the same bundles, crops and machine:

1. Model only (this process, no HTTP): crops/s of one forward pass (uint8 batch in, outputs out) of
   the re-ID bundle at batch 32 and 1 and of the attribute bundle at batch 32 and 1, on each runtime.
2. Service throughput: crops/s (crops per request / median request time) of ``POST /attributes`` and
   ``POST /gallery`` at 1 and 32 crops per request, on a ``reid-serve`` with ``REID_RUNTIME=onnx`` and
   one with ``REID_RUNTIME=torch``, next to the same work in this process (decode, resize, forward;
   no HTTP, no database).
3. ``POST /reid/query`` latency p50/p99 at each ``--sizes`` gallery size (default 10k), top 10, top 10
   of one camera, and top 1000, on both servers, next to the FAISS index alone.
4. Agreement: ``--agreement-queries`` query crops (200) sent to both servers; how many give the same
   top 10 (same entries, same order, scores within 1e-4), and the largest score difference. Each
   server enrolled the same crops (in step 2) with its own runtime into its own database, so this
   compares the gallery's embeddings as well as the queries'.
5. Cold start: seconds from launching ``reid-serve`` to ``/readyz`` answering 200, for each server,
   with an empty gallery and at each gallery size (the index is rebuilt from SQLite at start).

Crops are synthetic people (``tests/synthetic.py``) drawn at 128x64 and sent as JPEG, or, with
``--data-root``, Market-1501 crops (gallery from ``test/`` or ``bounding_box_test/``, queries from
``queries/`` or ``query/``). The gallery is filled up to each size with random unit vectors (with
random attributes) written straight into SQLite, the same rows into both servers' databases.
The servers run one at a time, each a subprocess reached over loopback with httpx; the client, the
server and the in-process baselines share the cores, and nothing runs while another part is timed.

Threads, batch size and workers are the service's own defaults (``REID_INTRA_OP_THREADS=0`` is cores
// ``REID_INFERENCE_WORKERS``) unless ``--threads``/``--batch-size`` say otherwise; both runtimes and
the baselines get the same. Progress goes to stderr, the markdown tables to stdout.

    .venv/bin/python benchmarks/service_bench.py                  # shipped bundles, < 10 min on 2 cores
    .venv/bin/python benchmarks/service_bench.py --quick          # smoke run, 1-2 min
    .venv/bin/python benchmarks/service_bench.py --sizes 10000 100000 --data-root ../shared/data/market1501
    .venv/bin/python benchmarks/service_bench.py --random-bundles --backbone mobilenet_v2
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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.attribute_schema import schema_as_dict  # noqa: E402
from app.bundle import EmbeddingSpec, Manifest, read_manifest  # noqa: E402
from app.gallery import store  # noqa: E402
from app.gallery.index import GalleryIndex  # noqa: E402
from app.inference import Models  # noqa: E402
from app.preprocess import decode_image, images_to_batch  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.synthetic import make_identities, render  # noqa: E402

RUNTIMES = ("onnx", "torch")
CAMERAS = 6
CROP_SIZE = (128, 64)  # (height, width) of the synthetic crops, as Market-1501's
TOLERANCE = 1e-4  # score agreement between the runtimes
AGREEMENT_K = 10


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs: counts are fixed where both servers must do the same work."""

    model_samples: int = 10  # at least this many timed forward passes per figure ...
    model_seconds: float = 4.0  # ... and at least this long
    requests_1: int = 60  # timed requests with 1 crop
    requests_32: int = 12  # timed requests with 32 crops
    queries: int = 500  # timed queries per query kind and server
    agreement_queries: int = 200


QUICK = Plan(
    model_samples=3, model_seconds=0.5, requests_1=8, requests_32=2, queries=60, agreement_queries=200
)


# -- bundles and crops --------------------------------------------------------------------------------


def make_random_bundles(root: Path, backbone: str, size: tuple[int, int], branch_dim: int | None):
    """Random-weight bundles with their ONNX graphs (speed does not depend on the weights)."""
    import torch

    from app.nets.attributes import AttributeNet, AttributeNetConfig
    from app.nets.bundles import save_bundle
    from app.nets.reid import ReIDNet, ReIDNetConfig
    from training.onnx_export import add_onnx

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
    add_onnx(root / "attributes", net=attributes)
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
    add_onnx(root / "reid", net=reid)
    return root / "attributes", root / "reid"


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def synthetic_crops(n: int, *, seed: int) -> list[bytes]:
    """``n`` distinct JPEG crops of 64 synthetic people seen by ``CAMERAS`` cameras."""
    people = make_identities(64, seed=11)
    rng = np.random.default_rng(seed)
    return [
        jpeg(render(people[int(rng.integers(len(people)))], 1 + i % CAMERAS, rng, CROP_SIZE))
        for i in range(n)
    ]


def folder_crops(root: Path, names: Sequence[str], n: int, *, seed: int) -> list[bytes]:
    """``n`` JPEG files drawn (without replacement, fixed seed) from the first of ``names`` under root."""
    folder = next((root / name for name in names if (root / name).is_dir()), None)
    if folder is None:
        sys.exit(f"{root}: none of {', '.join(names)} is a folder")
    paths = sorted(folder.glob("*.jpg"))
    if len(paths) < n:
        sys.exit(f"{folder}: {len(paths)} JPEG files; this run needs {n}")
    chosen = np.random.default_rng(seed).choice(len(paths), size=n, replace=False)
    return [paths[i].read_bytes() for i in sorted(chosen)]


# -- timing helpers -------------------------------------------------------------------------------------


def timings(run: Callable[[], object], *, count: int, seconds: float = 0.0, warmup: int = 1) -> list[float]:
    """At least ``count`` timed calls and at least ``seconds`` of them (at most 50x ``count``)."""
    for _ in range(warmup):
        run()
    samples: list[float] = []
    began = time.perf_counter()
    while len(samples) < count or (time.perf_counter() - began < seconds and len(samples) < 50 * count):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return samples


def rate(crops: int, samples: Sequence[float]) -> float:
    """Crops / the median call time: robust to bursts of load from other processes."""
    return crops / statistics.median(samples)


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


# -- 1. the models alone ----------------------------------------------------------------------------------


@dataclass
class ModelFigures:
    forward: dict[tuple[str, int], float] = field(default_factory=dict)  # (task, batch) -> crops/s
    pipeline: dict[tuple[str, int], float] = field(default_factory=dict)  # (endpoint, crops) -> crops/s
    query_embedding: tuple[float, float] = (0.0, 0.0)  # p50, p99 s: decode + embed one query crop
    query_vector: np.ndarray | None = None


def measure_models(
    attribute_dir: Path,
    reid_dir: Path,
    runtime: str,
    *,
    threads: int,
    batch_size: int,
    blobs: Sequence[bytes],
    query_blob: bytes,
    plan: Plan,
    say: Callable[[str], None],
) -> ModelFigures:
    if runtime == "torch":
        import torch

        torch.set_num_threads(threads)  # what the torch server does for its life
    models = Models.load(attribute_dir, reid_dir, batch_size=batch_size, runtime=runtime, threads=threads)
    assert models.runtimes == {runtime}, models.runtimes
    images = [decode_image(b) for b in blobs[:32]]
    figures = ModelFigures()
    for task, model in (("reid", models.reid), ("attributes", models.attributes)):
        for batch in (32, 1):
            x = images_to_batch(images[:batch], model.input_size)
            samples = timings(
                partial(model.runtime.run, x), count=plan.model_samples, seconds=plan.model_seconds, warmup=2
            )
            figures.forward[task, batch] = rate(batch, samples)
            say(f"{runtime}: {task} forward, batch {batch}: {figures.forward[task, batch]:.1f} crops/s")

    # What a request does in the service, without HTTP and the database: decode, resize, forward.
    pool = iter(blobs[i % len(blobs)] for i in range(10**9))

    def attributes(n: int) -> None:
        models.attributes.predict([decode_image(next(pool)) for _ in range(n)])

    def enroll(n: int) -> None:
        crops = [decode_image(next(pool)) for _ in range(n)]
        models.attributes.predict(crops)
        models.reid.embed(crops)

    for endpoint, run in (("attributes", attributes), ("gallery", enroll)):
        for n in (1, 32):
            samples = timings(partial(run, n), count=plan.model_samples, seconds=plan.model_seconds)
            figures.pipeline[endpoint, n] = rate(n, samples)
            say(f"{runtime}: in-process {endpoint}, {n} crop(s): {figures.pipeline[endpoint, n]:.1f} crops/s")

    def embed_query() -> np.ndarray:
        return models.reid.embed([decode_image(query_blob)])[0]

    samples = timings(embed_query, count=max(20, plan.queries // 5), seconds=plan.model_seconds, warmup=3)
    figures.query_embedding = percentiles(samples)
    figures.query_vector = embed_query()
    return figures


# -- the server -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "reid-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.main"]


class Server:
    """``reid-serve`` in a subprocess; ``start`` returns the seconds until /readyz said ok."""

    def __init__(self, runtime: str, env: dict[str, str], log: Path) -> None:
        self.runtime = runtime
        self.env = env | {"REID_RUNTIME": runtime}
        self.log_path = log
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> float:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.log_path.open("a")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [*serve_command(), "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        while True:
            if self.process.poll() is not None:
                self.log.close()
                tail = self.log_path.read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"{self.runtime} server exited: {' / '.join(tail)} (see {self.log_path})")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.log.close()


def files(blobs: Sequence[bytes], field: str = "images"):
    return [(field, (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


def reported_runtimes(client: httpx.Client) -> str:
    models = client.get("/models").json()
    return "/".join(str(models[task].get("runtime")) for task in ("attributes", "reid"))


# -- 2. throughput over HTTP ----------------------------------------------------------------------------


def measure_throughput(
    client: httpx.Client,
    *,
    attribute_blobs: Sequence[bytes],
    enroll_blobs: Sequence[bytes],
    plan: Plan,
    say: Callable[[str], None],
) -> dict[tuple[str, int], float]:
    """(endpoint, crops per request) -> crops/s. Enrolls ``enroll_blobs`` in order, every one once."""
    pool = iter(attribute_blobs[i % len(attribute_blobs)] for i in range(10**9))
    enroll_pool = iter(enroll_blobs)
    requests = 0

    def attributes(n: int) -> None:
        response = client.post("/attributes", files=files([next(pool) for _ in range(n)]))
        response.raise_for_status()

    def enroll(n: int) -> None:
        nonlocal requests
        blobs = [next(enroll_pool) for _ in range(n)]
        data = {"camera_id": f"cam-{requests % CAMERAS}"}
        requests += 1
        response = client.post("/gallery", files=files(blobs), data=data)
        assert response.status_code == 201 and response.json()["created"] == n, response.text

    figures = {}
    for endpoint, run in (("attributes", attributes), ("gallery", enroll)):
        for n, count in ((1, plan.requests_1), (32, plan.requests_32)):
            figures[endpoint, n] = rate(n, timings(partial(run, n), count=count))
            say(f"POST /{endpoint}, {n} crop(s)/request: {figures[endpoint, n]:.1f} crops/s")
    assert next(enroll_pool, None) is None, "every enrollment crop is enrolled once"
    return figures


def enroll_count(plan: Plan) -> int:
    """Crops that ``measure_throughput`` enrolls (one warm-up request of each size)."""
    return (plan.requests_1 + 1) * 1 + (plan.requests_32 + 1) * 32


# -- the gallery in SQLite ------------------------------------------------------------------------------


def top_up(url: str, target: int, *, model_version: str, dim: int, groups: list[dict], seed: int) -> None:
    """Insert random unit vectors, with random attributes, until the database holds ``target`` entries."""
    engine = store.open_engine(url)
    store.prepare_schema(engine)
    rng = np.random.default_rng(seed)
    entries, embeddings = store.Entry.__table__, store.Embedding.__table__
    attributes = store.EntryAttribute.__table__
    with engine.begin() as conn:
        have = conn.execute(select(func.count()).select_from(entries)).scalar_one()
        next_id = (conn.execute(select(func.max(entries.c.id))).scalar_one() or 0) + 1
    now = datetime.now(UTC).replace(tzinfo=None)
    for start in range(have, target, 5000):
        n = min(5000, target - start)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        classes = [rng.integers(0, len(g["classes"]), n) for g in groups]
        scores = rng.uniform(0.5, 1.0, (len(groups), n))
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
        attribute_rows = [
            {
                "entry_id": entry_id,
                "attribute": g["name"],
                "value": g["classes"][int(classes[k][i])],
                "score": float(scores[k, i]),
            }
            for i, entry_id in enumerate(ids)
            for k, g in enumerate(groups)
        ]
        with engine.begin() as conn:
            conn.execute(entries.insert(), rows)
            conn.execute(
                embeddings.insert(),
                [{"entry_id": e, "vector": vectors[i].tobytes()} for i, e in enumerate(ids)],
            )
            conn.execute(attributes.insert(), attribute_rows)
    engine.dispose()


def entry_digests(url: str) -> list[tuple[int, str]]:
    engine = store.open_engine(url)
    entries = store.Entry.__table__
    with engine.connect() as conn:
        rows = [
            (r[0], r[1]) for r in conn.execute(select(entries.c.id, entries.c.image_sha256).order_by("id"))
        ]
    engine.dispose()
    return rows


def load_index(url: str, *, model_version: str, dim: int, threads: int) -> tuple[GalleryIndex, np.ndarray]:
    """The same index the server builds, in this process, and the ids of camera 'cam-1'."""
    engine = store.open_engine(url)
    index = GalleryIndex(dim, threads=threads)
    with Session(engine) as session:
        for rows in store.iter_embeddings(session, model_version=model_version, dim=dim):
            index.add(rows.ids, rows.collections, rows.vectors, cameras=rows.cameras, times=rows.times)
        camera = store.matching_ids(
            session,
            collection="default",
            model_version=model_version,
            filters=store.SearchFilters(cameras=("cam-1",)),
        )
    engine.dispose()
    return index, camera


# -- 3. and 4. queries ----------------------------------------------------------------------------------

QUERY_KINDS = {  # name -> form fields
    "top 10": {"top_k": "10"},
    "top 10, 1 camera of 6": {"top_k": "10", "camera_id": "cam-1"},
    "top 1000": {"top_k": "1000"},
}


def measure_queries(client: httpx.Client, query_blob: bytes, plan: Plan) -> dict[str, tuple[float, float]]:
    def run(data: dict[str, str]) -> None:
        response = client.post("/reid/query", files=files([query_blob], "image"), data=data)
        response.raise_for_status()

    return {
        name: percentiles(timings(partial(run, data), count=plan.queries, warmup=3))
        for name, data in QUERY_KINDS.items()
    }


def top_matches(client: httpx.Client, blobs: Sequence[bytes]) -> list[list[tuple[int, float]]]:
    out = []
    for blob in blobs:
        response = client.post("/reid/query", files=files([blob], "image"), data={"top_k": str(AGREEMENT_K)})
        response.raise_for_status()
        out.append([(m["entry_id"], m["score"]) for m in response.json()["matches"]])
    return out


@dataclass
class Agreement:
    queries: int
    same: int  # same entries, same order, every score within TOLERANCE
    same_set: int  # same entries in any order
    max_difference: float  # over entries both returned for a query


def compare(a: list[list[tuple[int, float]]], b: list[list[tuple[int, float]]]) -> Agreement:
    same = same_set = 0
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scores_x, scores_y = dict(x), dict(y)
        common = scores_x.keys() & scores_y.keys()
        difference = max((abs(scores_x[e] - scores_y[e]) for e in common), default=0.0)
        worst = max(worst, difference)
        same_set += scores_x.keys() == scores_y.keys()
        same += [e for e, _ in x] == [e for e, _ in y] and difference <= TOLERANCE
    return Agreement(len(a), same, same_set, worst)


# -- the report -----------------------------------------------------------------------------------------


def verdict(ok: bool, text: str) -> str:
    return f"{text}: {'met' if ok else '**missed**'}"


def ms(p: tuple[float, float]) -> str:
    return f"{p[0] * 1000:.1f} / {p[1] * 1000:.1f} ms"


def table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attribute-bundle", type=Path, default=ROOT / "models_store" / "attributes")
    parser.add_argument("--reid-bundle", type=Path, default=ROOT / "models_store" / "reid")
    parser.add_argument(
        "--random-bundles",
        action="store_true",
        help="random-weight bundles of --backbone at --input-size instead of the two above",
    )
    parser.add_argument("--backbone", default="mobilenet_v2", help="for --random-bundles")
    parser.add_argument("--input-size", default="256x128", help="HEIGHTxWIDTH, for --random-bundles")
    parser.add_argument("--branch-dim", type=int, default=None, help="for --random-bundles (re-ID)")
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads per forward pass, here and in the servers "
        "(default: the service's, cores // REID_INFERENCE_WORKERS)",
    )
    parser.add_argument("--batch-size", type=int, help="crops per forward pass in the service (default: its)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000], help="gallery sizes for queries")
    parser.add_argument("--data-root", type=Path, help="Market-1501 folder for the crops (default synthetic)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, 1-2 min: fewer samples")
    parser.add_argument("--queries", type=int, help="timed queries per kind, size and server")
    parser.add_argument("--agreement-queries", type=int, help="query crops compared between the runtimes")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed at the end")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    if args.queries:
        plan = replace(plan, queries=args.queries)
    if args.agreement_queries:
        plan = replace(plan, agreement_queries=args.agreement_queries)
    sizes = sorted(set(args.sizes))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="reid-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()

    def say(text: object) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {text}", file=sys.stderr, flush=True)

    load_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    say(f"load average at the start: {load_start}; work in {workdir}")
    try:
        if args.random_bundles:
            h, w = (int(v) for v in args.input_size.lower().split("x"))
            attribute_dir, reid_dir = make_random_bundles(
                workdir / "bundles", args.backbone, (h, w), args.branch_dim
            )
            origin = "random weights"
        else:
            attribute_dir, reid_dir = args.attribute_bundle, args.reid_bundle
            origin = f"`{attribute_dir}`, `{reid_dir}`"
        bench(args, plan, sizes, workdir, attribute_dir, reid_dir, origin, load_start, say)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def bench(args, plan, sizes, workdir, attribute_dir, reid_dir, origin, load_start, say) -> None:
    attr_manifest, reid_manifest = read_manifest(attribute_dir), read_manifest(reid_dir)
    for directory, manifest in ((attribute_dir, attr_manifest), (reid_dir, reid_manifest)):
        if manifest.onnx is None:
            sys.exit(f"{directory}: no ONNX graph; add one with `reid-train add-onnx {directory}`")
    dim = reid_manifest.embedding.dim
    version = reid_manifest.version
    groups = attr_manifest.attribute_schema or schema_as_dict()
    overrides = {"intra_op_threads": args.threads} if args.threads else {}
    settings = Settings(**overrides, **({"batch_size": args.batch_size} if args.batch_size else {}))
    threads, batch_size = settings.resolved_threads(), settings.batch_size

    # The crops: the same ones for both runtimes.
    n_enroll = enroll_count(plan)
    if args.data_root:
        gallery_dirs, query_dirs = ("test", "bounding_box_test"), ("queries", "query")
        enroll_blobs = folder_crops(args.data_root, gallery_dirs, n_enroll + 64, seed=1)
        other_blobs, enroll_blobs = enroll_blobs[:64], enroll_blobs[64:]
        query_blobs = folder_crops(args.data_root, query_dirs, plan.agreement_queries + 1, seed=2)
        crops_from = f"Market-1501 crops from `{args.data_root}`"
    else:
        enroll_blobs = synthetic_crops(n_enroll, seed=1)
        other_blobs = synthetic_crops(64, seed=3)
        query_blobs = synthetic_crops(plan.agreement_queries + 1, seed=2)
        crops_from = f"synthetic people (tests/synthetic.py) at {CROP_SIZE[0]}x{CROP_SIZE[1]}, JPEG"
    query_blob, agreement_blobs = query_blobs[0], query_blobs[1:]

    # 1. The models alone, nothing else running.
    models: dict[str, ModelFigures] = {}
    for runtime in RUNTIMES:
        models[runtime] = measure_models(
            attribute_dir,
            reid_dir,
            runtime,
            threads=threads,
            batch_size=batch_size,
            blobs=other_blobs,
            query_blob=query_blob,
            plan=plan,
            say=say,
        )

    # 2. Throughput over HTTP; each server enrolls the same crops into its own database.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")} | {
        "REID_ATTRIBUTE_BUNDLE": str(Path(attribute_dir).resolve()),
        "REID_REID_BUNDLE": str(Path(reid_dir).resolve()),
        "REID_INTRA_OP_THREADS": str(threads),
        "REID_BATCH_SIZE": str(batch_size),
        "REID_INFERENCE_WORKERS": str(settings.inference_workers),
        "REID_FAISS_THREADS": str(settings.faiss_threads),
    }
    urls, servers = {}, {}
    for runtime in RUNTIMES:
        data = workdir / f"data-{runtime}"
        shutil.rmtree(data, ignore_errors=True)  # every run starts from an empty gallery
        urls[runtime] = f"sqlite:///{data / 'gallery.sqlite3'}"
        servers[runtime] = Server(
            runtime, env | {"REID_DATA_DIR": str(data)}, workdir / f"server-{runtime}.log"
        )
    starts: list[tuple[str, int, float, str]] = []  # (runtime, entries, seconds, reported runtimes)
    http: dict[str, dict[tuple[str, int], float]] = {}
    for runtime, server in servers.items():
        ready = server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                reported = reported_runtimes(client)
                starts.append((runtime, 0, ready, reported))
                say(f"{runtime} server ready in {ready:.1f} s (GET /models: {reported})")
                http[runtime] = measure_throughput(
                    client, attribute_blobs=other_blobs, enroll_blobs=enroll_blobs, plan=plan, say=say
                )
        finally:
            server.stop()
    digests = entry_digests(urls["onnx"])
    assert digests == entry_digests(urls["torch"]), "both databases hold the same entries under the same ids"

    # 3. and 4. Queries at each size; agreement at the first.
    queries: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    index_alone: dict[int, dict[str, tuple[float, float]]] = {}
    agreement: Agreement | None = None
    agreement_size = 0
    for size in sizes:
        if size < len(digests):
            say(f"skipping size {size}: the gallery already holds {len(digests)} enrolled crops")
            continue
        say(f"filling both galleries to {size:,} entries")
        for url in urls.values():
            top_up(url, size, model_version=version, dim=dim, groups=groups, seed=size)
        matches = {}
        for runtime, server in servers.items():
            ready = server.start()
            try:
                with httpx.Client(base_url=server.url, timeout=600) as client:
                    starts.append((runtime, size, ready, reported_runtimes(client)))
                    searchable = client.get("/gallery/stats").json().get("searchable")
                    assert searchable in (size, None), f"{searchable} searchable, expected {size}"
                    queries[runtime, size] = measure_queries(client, query_blob, plan)
                    say(
                        f"{runtime}, {size:,} entries: "
                        + ", ".join(f"{k} {ms(v)}" for k, v in queries[runtime, size].items())
                    )
                    if agreement is None:
                        matches[runtime] = top_matches(client, agreement_blobs)
            finally:
                server.stop()
        if agreement is None:
            agreement_size = size
            agreement = compare(matches["onnx"], matches["torch"])
            say(f"agreement: {agreement}")
        index, camera = load_index(
            urls["onnx"], model_version=version, dim=dim, threads=settings.faiss_threads
        )
        vector = models["onnx"].query_vector
        index_alone[size] = {
            name: percentiles(
                timings(
                    partial(
                        index.search,
                        "default",
                        vector,
                        int(data["top_k"]),
                        allowed=camera if "camera_id" in data else None,
                    ),
                    count=plan.queries,
                )
            )
            for name, data in QUERY_KINDS.items()
        }
        del index

    report(
        plan=plan,
        settings=settings,
        threads=threads,
        batch_size=batch_size,
        attr_manifest=attr_manifest,
        reid_manifest=reid_manifest,
        origin=origin,
        crops_from=crops_from,
        load_start=load_start,
        models=models,
        http=http,
        queries=queries,
        index_alone=index_alone,
        agreement=agreement,
        agreement_size=agreement_size,
        enrolled=len(digests),
        starts=starts,
    )


def report(
    *,
    plan: Plan,
    settings: Settings,
    threads: int,
    batch_size: int,
    attr_manifest: Manifest,
    reid_manifest: Manifest,
    origin: str,
    crops_from: str,
    load_start: str,
    models: dict[str, ModelFigures],
    http: dict[str, dict[tuple[str, int], float]],
    queries: dict[tuple[str, int], dict[str, tuple[float, float]]],
    index_alone: dict[int, dict[str, tuple[float, float]]],
    agreement: Agreement | None,
    agreement_size: int,
    enrolled: int,
    starts: list[tuple[str, int, float, str]],
) -> None:
    import onnxruntime
    import torch

    def size_of(m: Manifest) -> str:
        return f"{m.input_size[0]}x{m.input_size[1]}"

    a_size, r_size = size_of(attr_manifest), size_of(reid_manifest)
    load_end = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average {load_start} at the start "
        f"and {load_end} at the end. onnxruntime {onnxruntime.__version__}, torch {torch.__version__}. "
        f"{threads} intra-op thread(s) per forward pass, {settings.inference_workers} inference workers, "
        f"{settings.faiss_threads} FAISS thread(s), service batch size {batch_size}, the same for both "
        "runtimes and the in-process figures (client, server and in-process work share the cores)."
    )
    print(
        f"Bundles ({origin}): attributes `{attr_manifest.backbone}` {a_size}, re-ID "
        f"`{reid_manifest.backbone}` {r_size} with {reid_manifest.embedding.dim}-d embeddings. "
        f"Crops: {crops_from}. SQLite; one reid-serve at a time over loopback HTTP."
    )

    print("\n**Model only** (this process, no HTTP: one forward pass, uint8 batch in, outputs out)\n")
    rows = []
    for task, batch, name, size, target in (
        ("reid", 32, "re-ID", r_size, 4),
        ("reid", 1, "re-ID", r_size, 8),
        ("attributes", 32, "attributes", a_size, None),
        ("attributes", 1, "attributes", a_size, None),
    ):
        onnx, tor = models["onnx"].forward[task, batch], models["torch"].forward[task, batch]
        ratio = onnx / tor
        rows.append(
            (
                name,
                size,
                batch,
                threads,
                f"{onnx:.1f}",
                f"{tor:.1f}",
                f"{ratio:.1f}x",
                verdict(ratio >= target, f"≥ {target}x") if target else "",
            )
        )
    print(
        table(
            ("model", "input", "batch", "threads", "ONNX crops/s", "torch crops/s", "ONNX/torch", "target"),
            rows,
        )
    )

    print(
        "\n**Service throughput** (crops/s = crops per request / median request time; in-process = "
        "decode, resize and forward in this process, no HTTP, no database)\n"
    )
    rows = []
    for endpoint, n, size in (
        ("attributes", 1, a_size),
        ("attributes", 32, a_size),
        ("gallery", 1, f"{a_size} + {r_size}"),
        ("gallery", 32, f"{a_size} + {r_size}"),
    ):
        onnx, tor = http["onnx"][endpoint, n], http["torch"][endpoint, n]
        target = ""
        if (endpoint, n) == ("gallery", 32):
            target = verdict(onnx >= 3 * tor and onnx >= 500, "≥ 3x and ≥ 500 crops/s")
        elif (endpoint, n) == ("attributes", 32):
            target = verdict(onnx >= 1500, "≥ 1500 crops/s")
        rows.append(
            (
                f"POST /{endpoint}",
                n,
                min(n, batch_size),
                size,
                threads,
                f"{onnx:.1f}",
                f"{tor:.1f}",
                f"{onnx / tor:.1f}x",
                target,
                f"{models['onnx'].pipeline[endpoint, n]:.1f}",
                f"{models['torch'].pipeline[endpoint, n]:.1f}",
            )
        )
    header = (
        "request",
        "crops/request",
        "forward batch",
        "input",
        "threads",
        "ONNX server",
        "torch server",
        "ONNX/torch",
        "target",
        "ONNX in-process",
        "torch in-process",
    )
    print(table(header, rows))

    print(
        f"\n**POST /reid/query latency** p50 / p99 over {plan.queries} timed queries per row and server "
        "(one crop: decode, embed at batch 1, FAISS search, database, JSON). In this process: embedding "
        "alone = decode + embed the query crop; index alone = the FAISS search\n"
    )
    rows = []
    embedding = {runtime: ms(figures.query_embedding) for runtime, figures in models.items()}
    for size in sorted(index_alone):
        for name in QUERY_KINDS:
            onnx, tor = queries["onnx", size][name], queries["torch", size][name]
            target = ""
            if size == 10_000 and name == "top 10":
                target = verdict(onnx[0] <= 0.005 and onnx[1] <= 0.010, "p50 ≤ 5 ms, p99 ≤ 10 ms")
            elif size == 10_000 and name == "top 1000":
                target = verdict(onnx[0] <= 0.060, "p50 ≤ 60 ms")
            threads_used = f"{threads} + {settings.faiss_threads} FAISS"
            row = [name, f"{size:,}", r_size, threads_used, ms(onnx), ms(tor), target]
            rows.append([*row, embedding["onnx"], embedding["torch"], ms(index_alone[size][name])])
    header = (
        "query",
        "entries",
        "input",
        "threads",
        "ONNX server",
        "torch server",
        "target",
        "ONNX embedding alone",
        "torch embedding alone",
        "index alone",
    )
    print(table(header, rows))

    if agreement is not None:
        print(
            f"\n**Agreement** (each server enrolled the same {enrolled} crops with its own runtime, plus "
            f"random vectors up to {agreement_size:,} entries; the same query crops sent to both, top "
            f"{AGREEMENT_K}; the service rounds scores to 6 decimals)\n"
        )
        ok = agreement.same == agreement.queries and agreement.max_difference <= TOLERANCE
        print(
            table(
                (
                    "queries",
                    f"same top {AGREEMENT_K} (order, scores within {TOLERANCE:g})",
                    "same entries (any order)",
                    "max score difference",
                    "target",
                ),
                [
                    (
                        agreement.queries,
                        agreement.same,
                        agreement.same_set,
                        f"{agreement.max_difference:.2g}",
                        verdict(ok, f"all agree, within {TOLERANCE:g}"),
                    )
                ],
            )
        )

    print(
        "\n**Cold start** (launching reid-serve to /readyz answering 200: imports, bundles, index; the "
        "files are in the OS cache, as in this process the models were loaded before)\n"
    )
    rows = [
        (runtime, f"{entries:,}", f"{seconds:.1f}", reported)
        for runtime, entries, seconds, reported in sorted(starts, key=lambda s: (s[1], s[0]))
    ]
    print(table(("REID_RUNTIME", "gallery entries", "seconds to ready", "GET /models runtime"), rows))


if __name__ == "__main__":
    main()
