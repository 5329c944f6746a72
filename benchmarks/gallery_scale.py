"""A gallery of N entries: build, snapshot and load times, memory, search latency and recall (a script,
not a test).

Synthetic unit vectors with clusters like a re-ID model's: identities are points of a 48-d latent space
seen 1 to 11 times each (views scattered around the identity, mixed into the bundle's embedding
dimension), on 20 cameras over 28 days. They are written into a fresh database the way the service
writes them (``store.add_entries`` and the change log, 2,000 per transaction, two attributes each), then
the real ``Gallery`` opens it three times, each in a process of its own:

1. cold: no snapshot, so the index is rebuilt from the database (HNSW graph included) and its snapshot
   written: ``build_s``, ``snapshot_s``;
2. warm: the snapshot loaded, checked against the database and caught up: ``startup_s``, ``rss_mb`` (the
   process), ``index_mb`` (what opening the gallery added to it);
3. in that process, 200 queries (``--queries``; new views of enrolled identities) through
   ``Gallery.search_vector`` (the filters' SQL, the index, the matches' rows: what an HTTP query costs
   past inference), top 10, unfiltered and with a narrow (one camera in a 13.4-hour window: 0.1%) and a
   broad (6 of 20 cameras: 30%) filter; p50/p99 and recall@10 against exact search over the same
   admitted vectors; then unfiltered with the query expansion and the gallery-side augmentation the
   re-ID bundle validated (``query_paths``: the service's default path, and the previous one).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/gallery_scale.py --entries 100000 --json

``--backend milvus`` runs the same phases on Milvus (``--milvus-uri``: a server URL, default a Milvus
Lite file in the work folder): the cold start fills Milvus from the database (no snapshot: Milvus keeps
its rows), the warm one reads its ids and verifies them.

With ``--json`` the last line is one JSON object (``p50_ms``, ``p99_ms``, ``filtered_p99_ms``: the worse
filter, ``recall_at_10``: the worst of the three, ``startup_s``, ``rss_mb``, and the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.gallery import store  # noqa: E402
from app.gallery.store import NewEntry, SearchFilters  # noqa: E402

LATENT = 48
CAMERAS = 20
DAYS = 28
QUERIES = 200  # default; --queries
START = datetime(2026, 1, 1)
NARROW = SearchFilters(
    cameras=("cam07",),
    captured_after=START + timedelta(days=3),
    captured_before=START + timedelta(days=3, hours=13.44),
)
BROAD = SearchFilters(cameras=tuple(f"cam{c:02d}" for c in range(6)))
FILTERS = {"none": SearchFilters(), "narrow": NARROW, "broad": BROAD}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_models():
    from app.inference import Models

    bundles = ROOT / "models_store"
    return Models.load(bundles / "attributes", bundles / "reid", threads=1)


def synthesize(n: int, dim: int, queries: int = QUERIES, seed: int = 0):
    """(vectors, cameras, times, queries): ``n`` clustered unit vectors and their metadata."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((LATENT, dim)).astype(np.float32)
    views = rng.integers(1, 12, size=n)  # views per identity, 6 on average
    owner = np.repeat(np.arange(len(views)), views)[:n]
    people = rng.standard_normal((owner.max() + 1, LATENT)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 50_000):
        part = owner[start : start + 50_000]
        z = people[part] + 0.35 * rng.standard_normal((len(part), LATENT)).astype(np.float32)
        chunk = z @ mixing
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        chunk += 0.02 * rng.standard_normal(chunk.shape).astype(np.float32)
        x[start : start + len(part)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    day = rng.integers(0, DAYS, size=owner.max() + 1)[owner]  # a person passes on one day
    times = np.array(
        [
            START + timedelta(days=int(d), seconds=int(s))
            for d, s in zip(day, rng.integers(0, 86_400, size=n), strict=True)
        ]
    )
    cameras = np.array([f"cam{c:02d}" for c in rng.integers(0, CAMERAS, size=n)])
    who = rng.integers(0, owner.max() + 1, size=queries)
    q = (people[who] + 0.35 * rng.standard_normal((queries, LATENT)).astype(np.float32)) @ mixing
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return x, cameras, times, q


def admitted_mask(filters: SearchFilters, cameras: np.ndarray, times: np.ndarray) -> np.ndarray:
    mask = np.ones(len(cameras), bool)
    if filters.cameras:
        mask &= np.isin(cameras, filters.cameras)
    if filters.captured_after is not None:
        mask &= times >= filters.captured_after
    if filters.captured_before is not None:
        mask &= times <= filters.captured_before
    return mask


def populate(url: str, n: int, folder: Path, queries: int = QUERIES) -> dict:
    """Write the synthetic gallery and the exact answers; returns counts and times."""
    models = load_models()
    dim = models.reid.dim
    x, cameras, times, q = synthesize(n, dim, queries)
    engine = store.open_engine(url)
    store.prepare_schema(engine)
    from sqlalchemy.orm import sessionmaker

    sessions = sessionmaker(engine)
    start = time.perf_counter()
    ids = np.empty(n, np.int64)
    for first in range(0, n, 2000):
        rows = range(first, min(n, first + 2000))
        items = [
            NewEntry(
                image_sha256=f"{i:064x}",
                embedding=x[i],
                attributes={"gender": ("female" if i % 2 else "male", 0.9), "upper_color": ("red", 0.7)},
                identity=None,
                camera_id=str(cameras[i]),
                captured_at=times[i],
            )
            for i in rows
        ]
        with sessions.begin() as session:
            new, _ = store.add_entries(
                session,
                collection="default",
                items=items,
                model_version=models.reid.version,
                attribute_model_version=models.attributes.version,
            )
            store.log_changes(session, entry_ids=new, kind="added")
        ids[first : first + len(new)] = new
    populate_s = time.perf_counter() - start
    engine.dispose()
    # Exact answers: top 10 of every query among the vectors each filter admits.
    truth = {}
    for name, filters in FILTERS.items():
        mask = admitted_mask(filters, cameras, times)
        rows = np.flatnonzero(mask)
        best = np.empty((len(q), 10), np.int64)
        for start_row in range(0, len(q), 50):
            scores = q[start_row : start_row + 50] @ x[rows].T
            top = np.argsort(-scores, axis=1)[:, :10]
            best[start_row : start_row + 50] = ids[rows[top]]
        truth[name] = {"ids": best.tolist(), "admitted": int(mask.sum())}
    np.save(folder / "queries.npy", q)
    (folder / "truth.json").write_text(json.dumps(truth))
    return {
        "entries": n,
        "dim": dim,
        "populate_s": round(populate_s, 1),
        "admitted": {name: value["admitted"] for name, value in truth.items()},
    }


def open_gallery(url: str, folder: Path, build_threads: int, milvus: str | None):
    from app.gallery.gallery import Gallery

    models = load_models()
    before = rss_mb()
    start = time.perf_counter()
    backend = {"vector_backend": "milvus", "milvus_uri": milvus} if milvus else {}
    gallery = Gallery.open(url, models, snapshot_dir=folder / "index", build_threads=build_threads, **backend)
    return gallery, time.perf_counter() - start, before


def cold(url: str, folder: Path, build_threads: int, milvus: str | None) -> dict:
    gallery, seconds, _ = open_gallery(url, folder, build_threads, milvus)
    assert gallery.started_from == ("repaired" if milvus else "rebuilt"), gallery.started_from
    start = time.perf_counter()
    gallery.save_snapshot()
    snapshot_s = time.perf_counter() - start
    kinds = gallery.index.kinds()
    gallery.engine.dispose()  # (not close(): the snapshot is written)
    gallery.index.close()
    size = sum(p.stat().st_size for p in (folder / "index").rglob("*") if p.is_file())
    return {
        "build_s": round(seconds - snapshot_s, 1),
        "snapshot_s": round(snapshot_s, 2),
        "snapshot_mb": round(size / 2**20),
        "kind": kinds.get("default"),
    }


def percentile(values: list[float], p: float) -> float:
    return round(float(np.percentile(values, p)) * 1e3, 2)


def warm(url: str, folder: Path, build_threads: int, milvus: str | None) -> dict:
    gallery, seconds, before = open_gallery(url, folder, build_threads, milvus)
    assert gallery.started_from == ("verified" if milvus else "snapshot"), gallery.started_from
    result = {"startup_s": round(seconds, 2), "rss_mb": round(rss_mb()), "index_mb": round(rss_mb() - before)}
    q = np.load(folder / "queries.npy")
    truth = json.loads((folder / "truth.json").read_text())
    for name, filters in FILTERS.items():
        times, index_times, recall = [], [], []
        where = None if name == "none" else filters
        for i, vector in enumerate(q):
            start = time.perf_counter()
            _, matches = gallery.search_vector(
                collection="default", vector=vector, top_k=10, filters=filters, expand=False
            )
            times.append(time.perf_counter() - start)
            found = [m["entry_id"] for m in matches]
            recall.append(len(set(found) & set(truth[name]["ids"][i])) / 10)
            start = time.perf_counter()
            gallery.index.search("default", vector, 10, where=where)
            index_times.append(time.perf_counter() - start)
        result[name] = {
            "admitted": truth[name]["admitted"],
            "p50_ms": percentile(times, 50),
            "p99_ms": percentile(times, 99),
            "index_p50_ms": percentile(index_times, 50),
            "index_p99_ms": percentile(index_times, 99),
            "recall_at_10": round(float(np.mean(recall)), 4),
        }
    result["query_paths"] = query_paths(gallery, q)
    gallery.engine.dispose()
    gallery.index.close()
    return result


# The gallery-side path recorded before 2026-12-02 (docs/models.md), timed beside the default.
EXPAND_FIRST = {"order": "expand_first", "neighbours": 10, "alpha": 5.0, "shortlist": 100}


def query_paths(gallery, q: np.ndarray) -> dict:
    """p50/p99 of unfiltered top-10 searches with the query expansion alone, with the gallery-side
    augmentation the re-ID bundle validated (the service's default path) and with the previous
    expand-first rescoring, where the bundle validated them."""
    rescoring, out = gallery.gallery_side, {}
    paths = [("expanded", None)]
    if rescoring is not None:
        paths += [("gallery_side", rescoring), ("expand_first", rescoring.model_copy(update=EXPAND_FIRST))]
    for name, side in paths if gallery.expansion else []:
        gallery.gallery_side = side
        times = []
        for vector in q:
            start = time.perf_counter()
            gallery.search_vector(collection="default", vector=vector, top_k=10, filters=SearchFilters())
            times.append(time.perf_counter() - start)
        out[name] = {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}
    gallery.gallery_side = rescoring
    return out


def child(phase: str, url: str, folder: Path, build_threads: int, milvus: str | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--url",
        url,
        "--folder",
        str(folder),
        "--build-threads",
        str(build_threads),
        *(["--milvus-uri", milvus] if milvus else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{phase} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--json", action="store_true", help="the last line is one JSON object")
    parser.add_argument("--queries", type=int, default=QUERIES, help="timed queries per filter")
    parser.add_argument("--database-url", help="default: a new SQLite file in a temporary folder")
    parser.add_argument("--build-threads", type=int, default=1, help="FAISS threads building the graph")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--backend", choices=["faiss", "milvus"], default="faiss", help="the vector backend")
    parser.add_argument(
        "--milvus-uri", help="with --backend milvus: a server URL (default: a Milvus Lite file)"
    )
    parser.add_argument("--phase", choices=["cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run = cold if args.phase == "cold" else warm
        print(json.dumps(run(args.url, args.folder, args.build_threads, args.milvus_uri)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="gallery-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    milvus = None
    if args.backend == "milvus":
        milvus = args.milvus_uri or str(folder / "milvus.db")
    url = args.database_url or f"sqlite:///{folder / 'gallery.sqlite3'}"
    if args.database_url:
        from sqlalchemy import create_engine

        engine = create_engine(url)
        store.drop_schema(engine)
        engine.dispose()
    result = populate(url, args.entries, folder, args.queries)
    print(f"populated {args.entries} entries in {result['populate_s']} s", file=sys.stderr)
    result |= child("cold", url, folder, args.build_threads, milvus)
    print(f"cold start: rebuilt in {result['build_s']} s, snapshot {result['snapshot_s']} s", file=sys.stderr)
    result |= child("warm", url, folder, args.build_threads, milvus)
    result["backend"] = args.backend
    result["faiss_threads"] = 1
    result["cpu"] = os.cpu_count()
    result["p50_ms"] = result["none"]["p50_ms"]
    result["p99_ms"] = result["none"]["p99_ms"]
    result["filtered_p99_ms"] = max(result["narrow"]["p99_ms"], result["broad"]["p99_ms"])
    result["recall_at_10"] = min(result[name]["recall_at_10"] for name in FILTERS)
    print(
        f"{'':8} {'admitted':>9} {'p50 ms':>8} {'p99 ms':>8} {'index p50':>10} {'index p99':>10} "
        f"{'recall@10':>9}"
    )
    for name in FILTERS:
        r = result[name]
        print(
            f"{name:8} {r['admitted']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['index_p50_ms']:>10} "
            f"{r['index_p99_ms']:>10} {r['recall_at_10']:>9}"
        )
    print(
        f"start-up from the snapshot {result['startup_s']} s; rebuild {result['build_s']} s; snapshot "
        f"{result['snapshot_s']} s ({result['snapshot_mb']} MB); RSS {result['rss_mb']} MB, of it the "
        f"index {result['index_mb']} MB"
    )
    if args.json:
        print(json.dumps(result))
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
