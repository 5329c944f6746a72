"""Load benchmark (a script, not a test): many concurrent clients against a real ``reid-serve``.

``--clients`` clients (50) run for ``--duration`` seconds (120), each in a loop picking one of: enroll a
new crop (``POST /gallery``), query (``POST /reid/query``), list a page (``GET /gallery``), or delete one
of its own acknowledged entries (``DELETE /gallery/{id}``), with the ``--mix`` weights. Every client
keeps the ids the service acknowledged (201 with an entry) and the ones whose delete it acknowledged
(200). Afterwards the gallery is read back page by page: every acknowledged entry not deleted must be
there, every acknowledged delete gone, and ``/gallery/stats`` must show the index equal to the
searchable rows. Reported: requests, throughput, p50/p99/max latency and status codes per endpoint,
the number of 5xx (must be 0) and of transport errors (timeouts, refused connections), and the check.

The server is a ``reid-serve`` subprocess (the shipped bundles unless ``--models-dir``), started on
``--database-url`` (PostgreSQL; default ``REID_LOAD_DATABASE_URL``, else the database ``reid_load`` on the
server of ``REID_TEST_POSTGRES_URL``; its gallery tables are dropped first: give it a database of its
own, never one that tests use) or, with ``--sqlite``, a fresh SQLite file. The gallery is seeded with
``--seed-entries`` entries first so queries and lists have something to find. Crops are synthetic people
(``tests/synthetic.py``) at 128x64 JPEG, each enrollment unique (one pixel differs).

    runuser -u postgres -- createdb -O reid reid_load        # once, next to the test database
    nice -n 10 .venv/bin/python benchmarks/load.py                       # 50 clients, 2 minutes
    nice -n 10 .venv/bin/python benchmarks/load.py --clients 8 --duration 15 --json   # a quick run

The last line with ``--json`` is one JSON object with every figure. Client and server share the cores.
``benchmarks/faults.py`` reuses this workload to run faults under load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.gallery import store  # noqa: E402
from benchmarks.service_bench import free_port, serve_command  # noqa: E402
from tests.synthetic import make_identities, render  # noqa: E402

ENDPOINTS = ("enroll", "query", "list", "delete")
CROP_SIZE = (128, 64)
CAMERAS = 6


# -- the server -----------------------------------------------------------------------------------------


class Server:
    """``reid-serve`` in a subprocess with ``env`` added to this environment; logs to ``log``."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")} | env
        self.log_path = log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for /readyz; returns the seconds it took."""
        started = time.perf_counter()
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [*serve_command(), "--port", str(self.port), "--log-level", "warning"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"reid-serve exited: {' / '.join(tail)} (see {self.log_path})")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"reid-serve not ready after {timeout:.0f} s (see {self.log_path})")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _status_mib(self, key: str) -> float | None:
        """A memory line of the server's /proc status (``VmHWM``, ``VmRSS``), MiB; None once it is gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AssertionError):
            pass
        return None

    def peak_rss_mib(self) -> float | None:
        """The server's peak resident memory so far (VmHWM), MiB."""
        return self._status_mib("VmHWM")

    def rss_mib(self) -> float | None:
        """The server's resident memory now (VmRSS), MiB."""
        return self._status_mib("VmRSS")

    def kill(self) -> None:
        """SIGKILL, no shutdown at all."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

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


def default_database_url() -> str | None:
    url = os.environ.get("REID_LOAD_DATABASE_URL")
    if url:
        return url
    test_url = os.environ.get("REID_TEST_POSTGRES_URL")
    if not test_url:
        return None
    return make_url(test_url).set(database="reid_load").render_as_string(hide_password=False)


def empty_database(url: str) -> None:
    """Drop the gallery tables of ``url`` (a database of the benchmark's own)."""
    engine = create_engine(url)
    try:
        store.drop_schema(engine)
    finally:
        engine.dispose()


# -- crops ----------------------------------------------------------------------------------------------


class Crops:
    """Synthetic person crops: a few hundred drawn once, each enrollment made unique by one pixel."""

    def __init__(self, people: int = 200, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.people = make_identities(people, seed=seed)
        self.images = [
            (person, cam, np.asarray(render(person, cam, rng, CROP_SIZE)))
            for person in self.people
            for cam in (1, 2)
        ]
        self._counter = 0

    @staticmethod
    def jpeg(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    def unique(self, rng: random.Random) -> tuple[bytes, str, str]:
        """(new JPEG bytes, identity, camera): a drawn crop with one pixel set from a counter."""
        person, cam, pixels = rng.choice(self.images)
        self._counter += 1
        n = self._counter
        pixels = pixels.copy()
        pixels[n % CROP_SIZE[0], (n // CROP_SIZE[0]) % CROP_SIZE[1]] = [(n >> 8) & 255, n & 255, 77]
        pixels[0, 0] = [(n >> 16) & 255, (n >> 8) & 255, n & 255]
        return self.jpeg(pixels), f"p{person.pid}", f"cam-{cam + (n % 3) * 2}"

    def query(self, rng: random.Random) -> bytes:
        _, _, pixels = rng.choice(self.images)
        return self.jpeg(pixels)


def files(blob: bytes, field: str = "images"):
    return [(field, ("crop.jpg", blob, "image/jpeg"))]


# -- the workload ---------------------------------------------------------------------------------------


@dataclass
class Record:
    endpoint: str
    started: float  # seconds since the run started
    seconds: float
    status: int | None  # None: a transport error (timeout, refused, reset)
    error: str = ""
    retry_after: str | None = None


@dataclass
class Ledger:
    """What the service acknowledged: ids of created entries, ids whose delete it confirmed."""

    created: set[int] = field(default_factory=set)
    deleted: set[int] = field(default_factory=set)
    unacknowledged_enrolls: int = 0  # answered with an error or not at all: may or may not be stored
    uncertain: set[int] = field(default_factory=set)  # a delete sent but not answered: may have happened
    lost: set[int] = field(default_factory=set)  # acknowledged, never deleted, yet a delete found none

    def live(self) -> set[int]:
        """Entries that must be present: acknowledged, and no delete of them was sent unanswered."""
        return self.created - self.deleted - self.uncertain


@dataclass
class Workload:
    base: str
    crops: Crops
    mix: dict[str, float]
    timeout: float = 30.0
    records: list[Record] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    collection: str = "default"
    t0: float = 0.0

    async def _call(self, client: httpx.AsyncClient, endpoint: str, send: Callable) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            response = await send()
        except httpx.HTTPError as exc:
            self.records.append(
                Record(endpoint, start - self.t0, time.perf_counter() - start, None, type(exc).__name__)
            )
            return None
        self.records.append(
            Record(
                endpoint,
                start - self.t0,
                time.perf_counter() - start,
                response.status_code,
                retry_after=response.headers.get("retry-after"),
            )
        )
        return response

    async def enroll(self, client: httpx.AsyncClient, rng: random.Random, mine: list[int]) -> None:
        blob, identity, camera = self.crops.unique(rng)
        data = {"identity": identity, "camera_id": camera, "collection": self.collection}
        response = await self._call(
            client, "enroll", lambda: client.post("/gallery", files=files(blob), data=data)
        )
        if response is not None and response.status_code == 201:
            for entry in response.json()["entries"]:
                self.ledger.created.add(entry["id"])
                mine.append(entry["id"])
        else:
            self.ledger.unacknowledged_enrolls += 1

    async def query(self, client: httpx.AsyncClient, rng: random.Random, mine: list[int]) -> None:
        data = {"top_k": "10", "collection": self.collection}
        blob = self.crops.query(rng)
        await self._call(
            client, "query", lambda: client.post("/reid/query", files=files(blob, "image"), data=data)
        )

    async def list(self, client: httpx.AsyncClient, rng: random.Random, mine: list[int]) -> None:
        params = {"limit": 50, "offset": rng.randrange(0, 500), "collection": self.collection}
        await self._call(client, "list", lambda: client.get("/gallery", params=params))

    async def delete(self, client: httpx.AsyncClient, rng: random.Random, mine: list[int]) -> None:
        if not mine:
            return await self.list(client, rng, mine)
        entry_id = mine.pop(rng.randrange(len(mine)))
        response = await self._call(client, "delete", lambda: client.delete(f"/gallery/{entry_id}"))
        if response is not None and response.status_code == 200:
            self.ledger.deleted.add(entry_id)
            self.ledger.uncertain.discard(entry_id)
        elif response is not None and response.status_code == 404 and entry_id in self.ledger.uncertain:
            self.ledger.uncertain.discard(entry_id)  # an earlier unanswered delete went through
            self.ledger.deleted.add(entry_id)
        elif response is not None and response.status_code == 404:
            self.ledger.lost.add(entry_id)
        elif response is None and self.records[-1].error == "ConnectError":
            mine.append(entry_id)  # never reached the server (refused): nothing happened
        else:  # not confirmed (a 503, no answer): it may or may not have happened; tried again later
            self.ledger.uncertain.add(entry_id)
            mine.append(entry_id)

    async def client_loop(self, number: int, deadline: float, stop: asyncio.Event) -> None:
        rng = random.Random(number)
        names = list(self.mix)
        weights = [self.mix[n] for n in names]
        mine: list[int] = []
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=self.base, timeout=self.timeout, limits=limits) as client:
            while time.perf_counter() < deadline and not stop.is_set():
                await getattr(self, rng.choices(names, weights)[0])(client, rng, mine)

    async def run(self, clients: int, duration: float, stop: asyncio.Event | None = None) -> float:
        """Run ``clients`` loops for ``duration`` seconds (or until ``stop``); returns the wall time."""
        stop = stop or asyncio.Event()
        self.t0 = time.perf_counter()
        deadline = self.t0 + duration
        await asyncio.gather(*(self.client_loop(i, deadline, stop) for i in range(clients)))
        return time.perf_counter() - self.t0


def seed_gallery(base: str, crops: Crops, entries: int, ledger: Ledger) -> None:
    """Enroll ``entries`` crops, 16 per request (acknowledged ones go into ``ledger``)."""
    rng = random.Random(12345)
    with httpx.Client(base_url=base, timeout=120) as client:
        for start in range(0, entries, 16):
            blobs = [crops.unique(rng) for _ in range(min(16, entries - start))]
            parts = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, (b, _, _) in enumerate(blobs)]
            response = client.post("/gallery", files=parts, data={"camera_id": "cam-1"})
            response.raise_for_status()
            ledger.created.update(e["id"] for e in response.json()["entries"])


def read_back(base: str, collection: str = "default") -> tuple[set[int], dict]:
    """Every entry id of the collection (listed page by page) and /gallery/stats."""
    ids: set[int] = set()
    offset: int | None = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        while offset is not None:
            page = client.get("/gallery", params={"limit": 500, "offset": offset, "collection": collection})
            page.raise_for_status()
            body = page.json()
            ids.update(item["id"] for item in body["items"])
            offset = body["next_offset"]
        stats = client.get("/gallery/stats").json()
    return ids, stats


def check_ledger(ledger: Ledger, present: set[int], stats: dict) -> dict:
    """Every acknowledged entry not deleted is present, every acknowledged delete is gone, the index
    holds exactly the searchable rows."""
    live = ledger.live()
    missing = sorted((live - present) | ledger.lost)
    resurrected = sorted(ledger.deleted & present)
    return {
        "acknowledged_entries": len(ledger.created),
        "acknowledged_deletes": len(ledger.deleted),
        "expected_present": len(live),
        "present": len(present),
        "missing": missing[:20],
        "missing_count": len(missing),
        "deleted_but_present": resurrected[:20],
        "unacknowledged_enrolls": ledger.unacknowledged_enrolls,
        "unanswered_deletes": len(ledger.uncertain),
        "extra_unacknowledged": len(present - live - ledger.deleted),
        "index_size": stats.get("index_size"),
        "searchable": stats.get("searchable"),
        "ok": not missing and not resurrected and stats.get("index_size") == stats.get("searchable"),
    }


# -- the report -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def summarise(records: list[Record], wall: float) -> dict:
    per: dict[str, dict] = {}
    by_endpoint: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_endpoint[r.endpoint].append(r)
    for endpoint in ENDPOINTS:
        rows = by_endpoint.get(endpoint, [])
        times = [r.seconds * 1000 for r in rows if r.status is not None]
        statuses = Counter(
            str(r.status) if r.status is not None else f"transport error ({r.error})" for r in rows
        )
        per[endpoint] = {
            "requests": len(rows),
            "per_second": len(rows) / wall if wall else 0.0,
            "p50_ms": percentile(times, 50),
            "p99_ms": percentile(times, 99),
            "max_ms": max(times) if times else float("nan"),
            "statuses": dict(sorted(statuses.items())),
        }
    server_errors = sum(1 for r in records if r.status is not None and r.status >= 500)
    transport = sum(1 for r in records if r.status is None)
    return {
        "wall_seconds": wall,
        "requests": len(records),
        "per_second": len(records) / wall if wall else 0.0,
        "server_errors": server_errors,
        "transport_errors": transport,
        "endpoints": per,
    }


def table(summary: dict) -> str:
    lines = [
        "| endpoint | requests | req/s | p50 ms | p99 ms | max ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for endpoint, row in summary["endpoints"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        lines.append(
            f"| {endpoint} | {row['requests']} | {row['per_second']:.1f} | {row['p50_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | {row['max_ms']:.0f} | {statuses} |"
        )
    lines.append(
        f"| all | {summary['requests']} | {summary['per_second']:.1f} | | | | "
        f"5xx: {summary['server_errors']}, transport errors: {summary['transport_errors']} |"
    )
    return "\n".join(lines)


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in ENDPOINTS:
            raise argparse.ArgumentTypeError(f"unknown endpoint {name!r} in --mix; endpoints: {ENDPOINTS}")
        mix[name] = float(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("enroll=3,query=4,list=2,delete=1"))
    parser.add_argument("--database-url", default=default_database_url())
    parser.add_argument("--sqlite", action="store_true", help="a fresh SQLite file instead of PostgreSQL")
    parser.add_argument("--seed-entries", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: the shipped bundles")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="reid-load-"))
    env = {"REID_DATA_DIR": str(workdir / "data")}
    if args.models_dir:
        env["REID_MODELS_DIR"] = str(args.models_dir)
    if args.sqlite:
        where = "SQLite"
    else:
        if not args.database_url:
            parser.error("no PostgreSQL URL: pass --database-url, set REID_LOAD_DATABASE_URL, or --sqlite")
        empty_database(args.database_url)
        env["REID_DATABASE_URL"] = args.database_url
        where = "PostgreSQL " + make_url(args.database_url).render_as_string(hide_password=True)
    crops = Crops()
    server = Server(env, workdir / "server.log")
    print(f"starting reid-serve on {where} (log {server.log_path})", file=sys.stderr)
    ready = server.start()
    try:
        seeded = Ledger()
        seed_gallery(server.url, crops, args.seed_entries, seeded)
        print(
            f"ready in {ready:.1f} s; {len(seeded.created)} entries seeded; "
            f"{args.clients} clients for {args.duration:.0f} s",
            file=sys.stderr,
        )
        workload = Workload(server.url, crops, args.mix, timeout=args.timeout)
        workload.ledger.created |= seeded.created
        wall = asyncio.run(workload.run(args.clients, args.duration))
        present, stats = read_back(server.url)
        check = check_ledger(workload.ledger, present, stats)
        peak = server.peak_rss_mib()
    finally:
        server.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(workload.records, wall)
    summary |= {
        "clients": args.clients,
        "duration": args.duration,
        "database": "sqlite" if args.sqlite else "postgresql",
        "mix": args.mix,
        "seed_entries": args.seed_entries,
        "check": check,
        "server_peak_rss_mib": peak,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    print(f"\n{args.clients} clients, {wall:.0f} s, {where}, mix {args.mix}; {summary['machine']}\n")
    print(table(summary))
    print(
        f"\nacknowledged: {check['acknowledged_entries']} entries created, {check['acknowledged_deletes']} "
        f"deleted; expected present {check['expected_present']}, missing {check['missing_count']}, deleted "
        f"but present {len(check['deleted_but_present'])}; index {check['index_size']} = searchable "
        f"{check['searchable']}: {'ok' if check['ok'] else 'FAILED'}; server peak RSS {peak or 0:.0f} MiB"
    )
    if args.json:
        print(json.dumps(summary))
    return 0 if check["ok"] and summary["server_errors"] == 0 and summary["transport_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
