"""Re-embedding after a model upgrade, and what stored crops cost (a script, not a test).

Enrolls N real crops (Market-1501 JPEGs) with the ``reid-128x64`` bundle into a fresh SQLite gallery,
then re-embeds them with the ``reid`` bundle the way ``reid-serve reembed`` does, once per batch size
(the entries are marked outdated again between runs), and checks that every entry is searchable again
(the index rebuilt from the database holds all N; a sample of crops finds its own entry first) and that
the bytes served back by ``GET /gallery/{id}/image`` equal the bytes enrolled. Storage: the SQLite file
per entry with crops and without them (the same database with gallery_images dropped and vacuumed).

    .venv/bin/python benchmarks/reembed_bench.py --entries 3000 --batch-sizes 32 64 128
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import text, update

from app.api.uploads import content_type
from app.gallery import store
from app.gallery.gallery import Crop, EntryFields, Gallery
from app.gallery.reembed import reembed
from app.inference import Models
from app.main import create_app
from app.preprocess import decode_image
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def load_models(reid: str, batch: int, threads: int) -> Models:
    bundles = ROOT / "models_store"
    return Models.load(bundles / "attributes", bundles / reid, batch_size=batch, threads=threads)


def enroll_all(gallery: Gallery, blobs: list[bytes], paths: list[Path] | None = None) -> None:
    for first in range(0, len(blobs), 32):
        crops = [
            Crop(
                index=i,
                sha256=hashlib.sha256(b).hexdigest(),
                image=decode_image(b),
                data=b,
                content_type=content_type(b),
            )
            for i, b in enumerate(blobs[first : first + 32])
        ]
        pid = paths[first].name.split("_")[0] if paths else None
        gallery.enroll(collection="default", crops=crops, fields=EntryFields(identity=pid, camera_id="c1"))


def postgres_storage(url: str, models: Models, blobs: list[bytes]) -> None:
    """Bytes per entry of each gallery table on PostgreSQL (pg_total_relation_size: heap, TOAST, indexes)."""
    engine = store.open_engine(url)
    store.drop_schema(engine)
    engine.dispose()
    gallery = Gallery.open(url, models)
    enroll_all(gallery, blobs)
    n = len(blobs)
    with gallery.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
        sizes = {
            table: conn.scalar(text("SELECT pg_total_relation_size(:t)"), {"t": table})
            for table in store.Base.metadata.tables
        }
    gallery.close()
    per_entry = {table: size / n for table, size in sizes.items() if table != "reid_schema"}
    images = per_entry.pop("gallery_images")
    rest = sum(per_entry.values())
    detail = ", ".join(f"{table} {size:.0f}" for table, size in per_entry.items())
    crop = sum(map(len, blobs)) / n
    print(
        f"PostgreSQL storage per entry: gallery_images {images:.0f} bytes (crop {crop:.0f}), "
        f"the rest {rest:.0f} ({detail}); at 100,000 entries: {(images + rest) * 1e5 / 2**20:.0f} MiB with "
        f"crops, {rest * 1e5 / 2**20:.0f} MiB without"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=3000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--crops", type=Path, default=ROOT.parent / "shared/data/market1501/train")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample", type=int, default=200, help="crops queried / served back")
    parser.add_argument(
        "--postgres",
        help="also enroll the crops into this (emptied!) PostgreSQL database and report its table sizes",
    )
    args = parser.parse_args()

    paths = sorted(args.crops.glob("*.jpg"))
    random.Random(0).shuffle(paths)
    paths = paths[: args.entries]
    blobs = [p.read_bytes() for p in paths]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()} at the start")
    print(
        f"{len(blobs)} crops from {args.crops}, {sum(map(len, blobs)) / len(blobs):.0f} bytes each on average"
    )

    work = Path(tempfile.mkdtemp(prefix="reembed-bench-"))
    url = f"sqlite:///{work / 'gallery.sqlite3'}"
    old = load_models("reid-128x64", 32, args.threads)
    gallery = Gallery.open(url, old)
    start = time.perf_counter()
    enroll_all(gallery, blobs, paths)
    print(f"enrolled with reid-128x64 ({old.reid.version}) in {time.perf_counter() - start:.1f} s")
    old_version = old.reid.version
    gallery.close()

    # Storage, before re-embedding (the embeddings stay 512-d either way).
    database = work / "gallery.sqlite3"
    with sqlite3.connect(database) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        crop_bytes = conn.execute("SELECT sum(length(data)) FROM gallery_images").fetchone()[0]
    with_crops = database.stat().st_size
    bare = work / "bare.sqlite3"
    shutil.copy(database, bare)
    with sqlite3.connect(bare) as conn:
        conn.execute("DROP TABLE gallery_images")
    with sqlite3.connect(bare) as conn:
        conn.execute("VACUUM")
    without = bare.stat().st_size
    n = len(blobs)
    overhead = (with_crops - without - crop_bytes) / n
    print(
        f"storage: {with_crops / n:.0f} bytes per entry with its crop, {without / n:.0f} without "
        f"(crop bytes {crop_bytes / n:.0f}, so {overhead:.0f} bytes of row and "
        f"page overhead per stored crop); at 100,000 entries: {with_crops / n * 1e5 / 2**20:.0f} MiB with "
        f"crops, {without / n * 1e5 / 2**20:.0f} MiB without"
    )

    if args.postgres:
        postgres_storage(args.postgres, old, blobs)

    new = load_models("reid", max(args.batch_sizes), args.threads)
    images = [decode_image(b) for b in blobs[:512]]
    for batch in args.batch_sizes:
        start = time.perf_counter()
        new.reid.embed(images, batch_size=batch)
        rate = len(images) / (time.perf_counter() - start)
        print(f"model only, batch {batch}: {rate:.0f} crops/s (resize + ONNX)")
    engine = store.open_engine(url)
    gallery = Gallery(engine, new)
    for batch in args.batch_sizes:
        with gallery.sessions.begin() as session:
            session.execute(update(store.Entry).values(model_version=old_version))
        progress = reembed(gallery, batch_size=batch, max_pixels=4096 * 4096, update_index=False)
        print(
            f"reembed batch {batch}: {progress.reembedded}/{progress.total} in {progress.seconds:.1f} s = "
            f"{progress.crops_per_second:.0f} crops/s (without image {progress.without_image}, failed "
            f"{progress.failed}, skipped {progress.skipped}); load average {os.getloadavg()}"
        )
    gallery.close()

    settings = Settings(
        attribute_bundle=ROOT / "models_store/attributes",
        reid_bundle=ROOT / "models_store/reid",
        database_url=url,
        api_keys=[],
        index_sync_seconds=0,
    )
    sample = random.Random(1).sample(range(n), min(args.sample, n))
    with TestClient(create_app(settings)) as client:
        stats = client.get("/gallery/stats").json()
        first = 0
        same_bytes = 0
        ids = {hashlib.sha256(b).hexdigest(): None for b in blobs}
        for page in range(0, n, 500):
            for item in client.get("/gallery", params={"limit": 500, "offset": page}).json()["items"]:
                ids[item["image_sha256"]] = item
        for i in sample:
            entry = ids[hashlib.sha256(blobs[i]).hexdigest()]
            response = client.post("/reid/query", files=[("image", ("q.jpg", blobs[i], "image/jpeg"))])
            first += response.json()["matches"][0]["entry_id"] == entry["id"]
            served = client.get(entry["image_url"])
            same_bytes += served.content == blobs[i] and served.headers["content-type"] == "image/jpeg"
    print(
        f"after: {stats['searchable']}/{stats['entries']} searchable, index {stats['index_size']}, "
        f"outdated {stats['outdated']}; {first}/{len(sample)} sampled crops find their own entry first; "
        f"{same_bytes}/{len(sample)} served back byte for byte as image/jpeg"
    )
    print(f"load average at the end {os.getloadavg()}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
