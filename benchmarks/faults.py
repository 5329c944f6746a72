"""Fault checks (a script, not a test) against a real ``reid-serve`` under load (``load.py``'s workload).

Each scenario prints what it observed and ends with a verdict; ``--json`` adds one JSON line per
scenario. They need root (a private PostgreSQL cluster run as ``postgres``, a tmpfs mount) and
Debian's PostgreSQL binaries (``.ci/postgres.sh`` installs them); the shared test cluster is never
touched.

- ``pg-outage``: a private PostgreSQL cluster (``initdb`` in a temporary folder, its own port) is
  stopped (``pg_ctl stop -m fast``) for ``--outage`` seconds (10) while clients run; requests must get
  503 with ``Retry-After`` (no 500, nothing past the client timeout), ``/readyz`` must say not ready, and
  the service must recover by itself after ``pg_ctl start``, with every acknowledged entry there.
- ``kill9``: ``reid-serve`` is SIGKILLed under load, on SQLite and on PostgreSQL, and started again:
  every acknowledged entry is there, every acknowledged delete gone, the index equals the rows.
- ``full-disk``: the SQLite gallery on a small tmpfs, filled up by a filler file; enrollments must be
  refused with 507 (or 503) and a sentence, nothing half-written (``PRAGMA integrity_check``, one
  embedding, one crop and every attribute per entry), searches still answered; freeing the space lets
  enrollment work again without a restart.
- ``uploads``: ``--uploads`` (50) concurrent requests at the request-size limit (bodies announced over
  it, chunked bodies that grow over it, bodies exactly at it), the server's peak RSS measured.
- ``slow-client``: clients sending their body at 1 KB/s while others query and list; the others'
  latency next to a phase without them.

    nice -n 10 .venv/bin/python benchmarks/faults.py all
    nice -n 10 .venv/bin/python benchmarks/faults.py pg-outage --clients 10 --outage 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import (
    Crops,
    Ledger,
    Server,
    Workload,
    check_ledger,
    free_port,
    read_back,
    seed_gallery,
    summarise,
    table,
)

MIX = {"enroll": 3.0, "query": 4.0, "list": 2.0, "delete": 1.0}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- a private PostgreSQL cluster -------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise SystemExit("faults.py: no PostgreSQL binaries in /usr/lib/postgresql (source .ci/postgres.sh)")
    return str(versions[-1] / name)


class Cluster:
    """A throwaway PostgreSQL cluster in ``root``, superuser ``reid`` with trust on 127.0.0.1 only."""

    def __init__(self, root: Path) -> None:
        self.data = root / "pgdata"
        self.port = free_port()
        self.log = root / "postgres.log"
        root.mkdir(parents=True, exist_ok=True)
        root.parent.chmod(0o755)  # mkdtemp's folder: postgres must pass through it
        shutil.chown(root, "postgres", "postgres")
        self._as_postgres(
            pg_bin("initdb"), "-D", str(self.data), "-U", "reid", "-A", "trust", "--no-sync", "-E", "UTF8"
        )
        self.url = f"postgresql+psycopg://reid@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command], check=True, cwd="/tmp", capture_output=True
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._as_postgres(
            pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        self._as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.data.parent, ignore_errors=True)


# -- pg-outage --------------------------------------------------------------------------------------------


async def _monitor_readiness(
    base: str, until: asyncio.Event, seen: list[tuple[float, int | None]], t0: float
):
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while not until.is_set():
            try:
                status = (await client.get("/readyz")).status_code
            except httpx.HTTPError:
                status = None
            seen.append((time.perf_counter() - t0, status))
            await asyncio.sleep(0.2)


def seeded_workload(url: str, args) -> Workload:
    """100 entries enrolled, then the mixed workload that will run against them (its ledger knows them)."""
    crops = Crops(people=50)
    seeded = Ledger()
    seed_gallery(url, crops, 100, seeded)
    workload = Workload(url, crops, MIX, timeout=args.timeout)
    workload.ledger.created |= seeded.created
    return workload


def pg_outage(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="reid-faults-pg-"))
    cluster = Cluster(root / "cluster")
    cluster.start()
    server = Server(
        {"REID_DATABASE_URL": cluster.url, "REID_DATA_DIR": str(root / "data")}, root / "server.log"
    )
    try:
        server.start()
        workload = seeded_workload(server.url, args)
        before, after = 8.0, 15.0
        events: dict[str, float] = {}
        readiness: list[tuple[float, int | None]] = []

        async def controller():
            await asyncio.sleep(before)
            events["stop_begin"] = time.perf_counter() - workload.t0
            await asyncio.to_thread(cluster.stop)
            events["stopped"] = time.perf_counter() - workload.t0
            await asyncio.sleep(args.outage)
            events["start_begin"] = time.perf_counter() - workload.t0
            await asyncio.to_thread(cluster.start)
            events["started"] = time.perf_counter() - workload.t0

        async def run():
            done = asyncio.Event()
            workload.t0 = time.perf_counter()
            monitor = asyncio.create_task(_monitor_readiness(server.url, done, readiness, workload.t0))
            control = asyncio.create_task(controller())
            await workload.run(args.clients, before + args.outage + after)
            await control
            done.set()
            await monitor

        log(
            f"pg-outage: {args.clients} clients, the database stopped after {before:.0f} s "
            f"for {args.outage:.0f} s"
        )
        t_start = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - t_start
        present, stats = read_back(server.url)
        check = check_ledger(workload.ledger, present, stats)
    finally:
        server.stop()
        cluster.destroy()
        with contextlib.suppress(OSError):  # kept for a look afterwards
            shutil.copy(server.log_path, Path(tempfile.gettempdir()) / "reid-faults-pg-outage-server.log")
        shutil.rmtree(root, ignore_errors=True)

    records = workload.records
    stop, started = events["stop_begin"], events["started"]
    during = [r for r in records if stop <= r.started + r.seconds and r.started <= started]
    first_503 = min(
        (r.started + r.seconds for r in records if r.status == 503 and r.started >= stop), default=None
    )
    not_ready = min((t for t, s in readiness if t >= stop and s != 200), default=None)
    ready_again = min((t for t, s in readiness if t >= started and s == 200), default=None)
    first_ok_enroll = min(
        (
            r.started + r.seconds
            for r in records
            if r.endpoint == "enroll" and r.status == 201 and r.started >= started
        ),
        default=None,
    )
    statuses = Counter(str(r.status) if r.status is not None else "transport error" for r in during)
    without_retry_after = sum(1 for r in records if r.status == 503 and not r.retry_after)
    max_during = max((r.seconds for r in during), default=0.0)
    result = {
        "scenario": "pg-outage",
        "clients": args.clients,
        "outage_seconds": args.outage,
        "events": events,
        "statuses_during_outage": dict(statuses),
        "server_errors_other_than_503": sum(
            1 for r in records if r.status is not None and r.status >= 500 and r.status != 503
        ),
        "transport_errors": sum(1 for r in records if r.status is None),
        "503_without_retry_after": without_retry_after,
        "max_latency_during_outage_s": max_during,
        "seconds_to_first_503": None if first_503 is None else first_503 - stop,
        "seconds_to_readyz_not_ready": None if not_ready is None else not_ready - stop,
        "seconds_to_readyz_ready_after_start": None if ready_again is None else ready_again - started,
        "seconds_to_first_enroll_after_start": None if first_ok_enroll is None else first_ok_enroll - started,
        "summary": summarise(records, wall),
        "check": check,
    }
    result["ok"] = (
        check["ok"]
        and result["server_errors_other_than_503"] == 0
        and result["transport_errors"] == 0
        and without_retry_after == 0
        and max_during < args.timeout
        and not_ready is not None
        and ready_again is not None
        and first_ok_enroll is not None
    )
    print(f"\n## pg-outage: PostgreSQL stopped for {args.outage:.0f} s under {args.clients} clients\n")
    print(table(result["summary"]))
    print(
        f"\nstop took {events['stopped'] - stop:.1f} s, "
        f"start {events['started'] - events['start_begin']:.1f} s; during the outage: {dict(statuses)}; "
        f"first 503 {fmt(result['seconds_to_first_503'])} after the stop "
        f"began, /readyz not ready after {fmt(result['seconds_to_readyz_not_ready'])}, ready again "
        f"{fmt(result['seconds_to_readyz_ready_after_start'])} after the database was back, first enrollment "
        f"{fmt(result['seconds_to_first_enroll_after_start'])} after; slowest request during the outage "
        f"{max_during:.2f} s; 5xx other than 503: {result['server_errors_other_than_503']}; 503 without "
        f"Retry-After: {without_retry_after}; transport errors: {result['transport_errors']}"
    )
    print(ledger_line(check))
    verdict(result)
    return result


def fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"


def ledger_line(check: dict) -> str:
    return (
        f"acknowledged: {check['acknowledged_entries']} created, {check['acknowledged_deletes']} deleted, "
        f"{check['unanswered_deletes']} deletes unanswered; must be present {check['expected_present']}, "
        f"missing {check['missing_count']}, deleted but present {len(check['deleted_but_present'])}; "
        f"index {check['index_size']} = searchable {check['searchable']}"
    )


def verdict(result: dict) -> None:
    print(f"\n{result['scenario']}: {'ok' if result['ok'] else 'FAILED'}")


# -- kill9 ------------------------------------------------------------------------------------------------


def kill9(args) -> dict:
    results = {}
    for database in ("sqlite", "postgresql"):
        root = Path(tempfile.mkdtemp(prefix="reid-faults-kill-"))
        cluster = None
        env = {"REID_DATA_DIR": str(root / "data")}
        if database == "postgresql":
            cluster = Cluster(root / "cluster")
            cluster.start()
            env["REID_DATABASE_URL"] = cluster.url
        port = free_port()
        server = Server(env, root / "server.log", port=port)
        try:
            server.start()
            workload = seeded_workload(server.url, args)

            async def run(workload: Workload = workload, server: Server = server) -> float:
                stop = asyncio.Event()
                task = asyncio.create_task(workload.run(args.clients, 60, stop))
                await asyncio.sleep(args.kill_after)
                server.kill()
                killed_at = time.perf_counter() - workload.t0
                await asyncio.sleep(1.0)  # the clients see refused connections
                stop.set()
                await task
                return killed_at

            log(f"kill9 ({database}): {args.clients} clients, SIGKILL after {args.kill_after:.0f} s")
            killed_at = asyncio.run(run())
            restart = server.start()
            present, stats = read_back(server.url)
            check = check_ledger(workload.ledger, present, stats)
            # In-flight requests cancelled with the clients count as unacknowledged, like the refused ones.
        finally:
            server.stop()
            if cluster is not None:
                cluster.destroy()
            shutil.rmtree(root, ignore_errors=True)
        records = workload.records
        before = [r for r in records if r.started + r.seconds <= killed_at]
        results[database] = {
            "requests_before_kill": len(before),
            "server_errors_before_kill": sum(1 for r in before if r.status is not None and r.status >= 500),
            "restart_seconds": restart,
            "check": check,
        }
        print(f"\n## kill9 on {database}: SIGKILL after {killed_at:.1f} s of {args.clients} clients\n")
        print(
            f"{len(before)} requests answered before the kill "
            f"(5xx: {results[database]['server_errors_before_kill']}), restart to ready {restart:.1f} s"
        )
        print(ledger_line(check))
    result = {"scenario": "kill9", "databases": results}
    result["ok"] = all(r["check"]["ok"] and r["server_errors_before_kill"] == 0 for r in results.values())
    verdict(result)
    return result


# -- full-disk --------------------------------------------------------------------------------------------


def sqlite_consistency(path: Path) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        count = {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("gallery_entries", "gallery_embeddings", "gallery_images", "gallery_entry_attributes")
        }
        orphans = conn.execute(
            "SELECT count(*) FROM gallery_entries e WHERE "
            "NOT EXISTS (SELECT 1 FROM gallery_embeddings b WHERE b.entry_id = e.id) "
            "OR NOT EXISTS (SELECT 1 FROM gallery_images i WHERE i.entry_id = e.id)"
        ).fetchone()[0]
    finally:
        conn.close()
    return {"integrity": integrity, "rows": count, "entries_missing_a_part": orphans}


def full_disk(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="reid-faults-disk-"))
    mount = root / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.disk_mib}m", "tmpfs", str(mount)], check=True)
    server = Server({"REID_DATA_DIR": str(mount / "data")}, root / "server.log")
    filler = mount / "filler"
    try:
        server.start()
        crops = Crops(people=50)
        ledger = Ledger()
        seed_gallery(server.url, crops, 50, ledger)
        free = shutil.disk_usage(mount).free
        with filler.open("wb") as f:  # leave about 256 kB
            f.write(b"\0" * max(0, free - 256 * 1024))
        log(f"full-disk: {args.disk_mib} MiB tmpfs, {shutil.disk_usage(mount).free // 1024} kB left")
        rng = random.Random(1)
        statuses: Counter[str] = Counter()
        first_refusal = None
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(400):
                blob, identity, camera = crops.unique(rng)
                response = client.post(
                    "/gallery",
                    files=[("images", ("c.jpg", blob, "image/jpeg"))],
                    data={"identity": identity, "camera_id": camera},
                )
                statuses[str(response.status_code)] += 1
                if response.status_code == 201:
                    ledger.created.update(e["id"] for e in response.json()["entries"])
                    continue
                first_refusal = first_refusal or {
                    "status": response.status_code,
                    "content_type": response.headers.get("content-type"),
                    "retry_after": response.headers.get("retry-after"),
                    "detail": response.json().get("detail")
                    if response.headers.get("content-type", "").endswith("json")
                    else response.text[:200],
                }
                if statuses[str(response.status_code)] >= 5:
                    break
            query = client.post("/reid/query", files=[("image", ("q.jpg", crops.query(rng), "image/jpeg"))])
            ready = client.get("/readyz").status_code
        present, stats = read_back(server.url)
        check = check_ledger(ledger, present, stats)
        consistency = sqlite_consistency(mount / "data" / "gallery.sqlite3")
        filler.unlink()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            blob, identity, camera = crops.unique(rng)
            again = client.post("/gallery", files=[("images", ("c.jpg", blob, "image/jpeg"))]).status_code
    finally:
        server.stop()
        subprocess.run(["umount", str(mount)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    refused = first_refusal or {}
    rows = consistency["rows"]
    whole = (
        consistency["integrity"] == "ok"
        and consistency["entries_missing_a_part"] == 0
        and rows["gallery_entries"] == rows["gallery_embeddings"] == rows["gallery_images"]
        and rows["gallery_entry_attributes"] == 12 * rows["gallery_entries"]
    )
    result = {
        "scenario": "full-disk",
        "statuses": dict(statuses),
        "first_refusal": refused,
        "query_status_while_full": query.status_code,
        "readyz_while_full": ready,
        "consistency": consistency,
        "enroll_after_freeing": again,
        "check": check,
        "ok": refused.get("status") in (503, 507)
        and whole
        and check["ok"]
        and again == 201
        and "500" not in statuses,
    }
    print(f"\n## full-disk: SQLite on a {args.disk_mib} MiB tmpfs filled up\n")
    print(
        f"enrollments: {dict(statuses)}; the first refusal: {refused.get('status')} "
        f"{refused.get('content_type')} "
        f"'{refused.get('detail')}'; while full: query {query.status_code}, /readyz {ready}; database: "
        f"integrity {consistency['integrity']}, rows {rows}, entries missing a part "
        f"{consistency['entries_missing_a_part']}; after freeing space: enroll {again}"
    )
    print(ledger_line(check))
    verdict(result)
    return result


# -- uploads ----------------------------------------------------------------------------------------------


def multipart_at(limit: int, boundary: str) -> bytes:
    """A multipart body of exactly ``limit`` bytes: two files of random bytes (not images)."""
    head = lambda i: (  # noqa: E731
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    overhead = len(head(0)) + len(b"\r\n") + len(head(1)) + len(tail)
    payload = limit - overhead
    first = payload // 2
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=payload, dtype=np.uint8).tobytes()
    body = head(0) + data[:first] + b"\r\n" + head(1) + data[first:] + tail
    assert len(body) == limit
    return body


async def _send_raw(port: int, head: bytes, chunks, read_timeout: float) -> tuple[int | None, float]:
    """Send ``head`` and ``chunks``; the status line of the answer, read while sending (a server that
    refuses a body answers before it has read it, and may close the connection under the writer)."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None, time.perf_counter() - start
    answer = asyncio.create_task(asyncio.wait_for(reader.readline(), read_timeout))
    try:
        writer.write(head)
        for chunk in chunks:
            if answer.done():
                break
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass  # the server closed the connection after answering: read what it said
    try:
        line = await answer
        status = int(line.split()[1]) if line else None
    except (TimeoutError, OSError, ValueError, IndexError):
        status = None
    writer.close()
    return status, time.perf_counter() - start


def uploads(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="reid-faults-uploads-"))
    limit = args.request_mib * 1024 * 1024
    env = {"REID_DATA_DIR": str(root / "data"), "REID_MAX_REQUEST_BYTES": str(limit)}
    server = Server(env, root / "server.log")
    phases = {}
    try:
        server.start()
        idle = server.rss_mib()
        boundary = "reidfaultsboundary"
        at_limit = multipart_at(limit, boundary)
        over = at_limit + b"x" * 1024
        chunk = 256 * 1024

        def head(length: int | None) -> bytes:
            lines = [
                "POST /gallery HTTP/1.1",
                "Host: 127.0.0.1",
                f"Content-Type: multipart/form-data; boundary={boundary}",
            ]
            lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
            return ("\r\n".join(lines) + "\r\n\r\n").encode()

        def plain(body: bytes):
            return [body[i : i + chunk] for i in range(0, len(body), chunk)]

        def chunked(body: bytes):
            return [f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in plain(body)] + [b"0\r\n\r\n"]

        cases = {
            "announced over the limit": (head(len(over)), plain(over)),
            "chunked, growing over it": (head(None), chunked(over)),
            "exactly at the limit": (head(len(at_limit)), plain(at_limit)),
        }
        for name, (request_head, chunks) in cases.items():

            async def burst(request_head: bytes = request_head, chunks: list[bytes] = chunks):
                return await asyncio.gather(
                    *(_send_raw(server.port, request_head, chunks, 120) for _ in range(args.uploads))
                )

            before = server.peak_rss_mib()
            start = time.perf_counter()
            answers = asyncio.run(burst())
            phases[name] = {
                "statuses": dict(Counter(str(s) for s, _ in answers)),
                "seconds": time.perf_counter() - start,
                "slowest_s": max(t for _, t in answers),
                "peak_rss_mib": server.peak_rss_mib(),
                "peak_rss_before_mib": before,
            }
            log(f"uploads, {name}: {phases[name]}")
        healthy = httpx.get(f"{server.url}/readyz", timeout=10).status_code
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    peak = max(p["peak_rss_mib"] for p in phases.values())
    bound = (
        idle + 2 * args.request_mib * 2 + args.uploads * 2 + 100
    )  # two held in memory at a time + spool buffers
    result = {
        "scenario": "uploads",
        "uploads": args.uploads,
        "request_limit_mib": args.request_mib,
        "idle_rss_mib": idle,
        "phases": phases,
        "peak_rss_mib": peak,
        "readyz_after": healthy,
        "ok": healthy == 200
        and all("500" not in p["statuses"] for p in phases.values())
        # Refused before its body is read, a request's connection is closed with the body unread, so the
        # kernel may reset it before the client reads the 413 (no lingering close): "None" is allowed there.
        and all(
            "None" not in p["statuses"] for name, p in phases.items() if name != "announced over the limit"
        )
        and peak < bound,
        "bound_mib": bound,
    }
    print(f"\n## uploads: {args.uploads} concurrent requests at a {args.request_mib} MiB request limit\n")
    print("| requests | statuses | seconds | slowest | server peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, p in phases.items():
        print(
            f"| {name} | {p['statuses']} | {p['seconds']:.1f} | {p['slowest_s']:.1f} | "
            f"{p['peak_rss_mib']:.0f} |"
        )
    print(
        f"\nidle RSS {idle:.0f} MiB, peak {peak:.0f} MiB (bound checked: {bound:.0f} MiB); "
        f"/readyz after: {healthy}"
    )
    verdict(result)
    return result


# -- slow-client ------------------------------------------------------------------------------------------


def slow_client(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="reid-faults-slow-"))
    server = Server({"REID_DATA_DIR": str(root / "data")}, root / "server.log")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    image = buffer.getvalue()
    boundary = "reidslowboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="slow.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /gallery HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    seconds = len(body) / 1024

    async def slow_one() -> tuple[int | None, float]:
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head)
            for i in range(0, len(body), 1024):
                writer.write(body[i : i + 1024])
                await writer.drain()
                await asyncio.sleep(1.0)
            line = await asyncio.wait_for(reader.readline(), 60)
            writer.close()
            return int(line.split()[1]), time.perf_counter() - start
        except (TimeoutError, OSError, ValueError, IndexError):
            return None, time.perf_counter() - start

    try:
        server.start()
        crops = Crops(people=50)
        seed_gallery(server.url, crops, 100, Ledger())
        mix = {"query": 2.0, "list": 1.0}

        async def phase(slow: int):
            workload = Workload(server.url, crops, mix, timeout=args.timeout)
            tasks = [asyncio.create_task(slow_one()) for _ in range(slow)]
            wall = await workload.run(args.clients, seconds)
            slow_answers = await asyncio.gather(*tasks)
            return summarise(workload.records, wall), slow_answers

        log(
            f"slow-client: body of {len(body)} bytes at 1 KB/s ({seconds:.0f} s); "
            f"{args.clients} other clients"
        )
        baseline, _ = asyncio.run(phase(0))
        with_slow, answers = asyncio.run(phase(args.slow_clients))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    def p(summary, endpoint, q):
        return summary["endpoints"][endpoint][f"p{q}_ms"]

    result = {
        "scenario": "slow-client",
        "slow_clients": args.slow_clients,
        "body_bytes": len(body),
        "baseline": baseline,
        "with_slow_clients": with_slow,
        "slow_answers": [{"status": s, "seconds": t} for s, t in answers],
    }
    worst = max(p(with_slow, e, 99) / max(p(baseline, e, 99), 1e-9) for e in ("query", "list"))
    result["p99_ratio"] = worst
    result["ok"] = (
        all(s in (200, 201) for s, _ in answers)  # the same bytes: one created, the others 'existing'
        and with_slow["server_errors"] == 0
        and with_slow["transport_errors"] == 0
        and worst < 3
    )
    print(
        f"\n## slow-client: {args.slow_clients} clients sending {len(body)} bytes at 1 KB/s, "
        f"{args.clients} others\n"
    )
    print("| phase | query p50 / p99 ms | list p50 / p99 ms | requests/s |")
    print("|---|---|---|---|")
    for name, s in (
        ("without slow clients", baseline),
        (f"with {args.slow_clients} slow clients", with_slow),
    ):
        print(
            f"| {name} | {p(s, 'query', 50):.0f} / {p(s, 'query', 99):.0f} | {p(s, 'list', 50):.0f} / "
            f"{p(s, 'list', 99):.0f} | {s['per_second']:.1f} |"
        )
    print(
        f"\nslow uploads answered: {dict(Counter(str(s) for s, _ in answers))} "
        f"after {max(t for _, t in answers):.0f} s"
    )
    verdict(result)
    return result


SCENARIOS = {
    "pg-outage": pg_outage,
    "kill9": kill9,
    "full-disk": full_disk,
    "uploads": uploads,
    "slow-client": slow_client,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--clients", type=int, default=10, help="clients of the load under the fault")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    parser.add_argument("--outage", type=float, default=10.0, help="pg-outage: seconds the database is down")
    parser.add_argument("--kill-after", type=float, default=8.0, help="kill9: seconds of load before SIGKILL")
    parser.add_argument("--disk-mib", type=int, default=16, help="full-disk: size of the tmpfs")
    parser.add_argument("--uploads", type=int, default=50, help="uploads: concurrent requests")
    parser.add_argument("--request-mib", type=int, default=16, help="uploads: REID_MAX_REQUEST_BYTES in MiB")
    parser.add_argument("--slow-clients", type=int, default=1, help="slow-client: clients sending at 1 KB/s")
    parser.add_argument("--json", action="store_true", help="one JSON line per scenario at the end")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and args.scenario in ("pg-outage", "kill9", "full-disk", "all"):
        parser.error("needs root (a private PostgreSQL cluster run as postgres, a tmpfs mount)")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = [SCENARIOS[name](args) for name in names]
    if args.json:
        for result in results:
            print(json.dumps(result, default=str))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
