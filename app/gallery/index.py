"""The in-memory search index: inner product over L2-normalised embeddings (cosine), with FAISS.

Each collection keeps its vectors as float32 rows, in the order they were added: an ``IndexFlatIP``
while the collection is small (every search exact), an ``IndexHNSWFlat`` over the same kind of rows
once it holds more than ``exact_max`` entries (approximate, recall@10 about 0.99 at ``ef_search``).
Rows never move: removing an entry marks its row dead, and every search skips dead rows (a bitmap
selector); re-embedding is a removal and an append. ``maintain`` compacts a collection with many dead
rows and moves one past ``exact_max`` to HNSW, building outside the lock.

Filters stay exact. A filter's admitted rows come from the camera and capture time each row keeps
(``select``, ``where=``) or, for attribute conditions, from the database (``allowed=`` ids). When they
are at most ``exact_max`` (or the collection is flat), exactly those vectors are scored (gathered when
they are few, else a scan with a selector), so a narrow filter returns its true best matches (the way
Qdrant's planner switches to a full scan of the filtered points). Otherwise the HNSW search runs with
the admitted rows as a selector and a search breadth widened in proportion to how few the filter
admits.

Why HNSW and not IVF, and why these numbers: docs/service.md, *Scale*.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faiss
import numpy as np

EXACT_MAX = 20_000  # flat up to this many entries, and exact scoring of filters admitting up to this many
HNSW_M = 32  # graph neighbours per node
EF_CONSTRUCTION = 40
EF_SEARCH = 128  # search breadth of an unfiltered query up to 100k rows (ef_search: more past that)
EF_MAX = 2048  # the widest a filtered query's breadth grows
COMPACT_DEAD_FRACTION = 0.2  # dead rows past this share of a collection's rows get it rebuilt by maintain()


NO_TIME = np.iinfo(np.int64).min  # a row without captured_at
EPOCH = datetime(1970, 1, 1)


def microseconds(moment: datetime | None) -> int:
    """A naive-UTC time (what the database stores) as integer microseconds; NO_TIME for None."""
    if moment is None:
        return NO_TIME
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return (moment - EPOCH) // timedelta(microseconds=1)


def _grow(array: np.ndarray, size: int, fill: int | bool) -> np.ndarray:
    """``array`` with room for at least ``size`` items (doubling), new items ``fill``."""
    if size <= len(array):
        return array
    grown = np.full(max(size, 2 * len(array), 1024), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


@dataclass
class _Collection:
    """One collection's rows: ``index`` (flat or HNSW, labels are row numbers), the entry id of each row,
    whether it is alive, and the two fields filters test most (camera code, -1 for none; captured_at in
    microseconds, NO_TIME for none). The arrays have spare capacity; ``rows`` are in use."""

    index: faiss.Index
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    cameras: np.ndarray = field(default_factory=lambda: np.full(0, -1, np.int32))
    times: np.ndarray = field(default_factory=lambda: np.full(0, NO_TIME, np.int64))
    live: int = 0
    _bitmap: np.ndarray | None = None  # packed ``alive``, cached until the next change

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    @property
    def approximate(self) -> bool:
        return isinstance(self.index, faiss.IndexHNSW)

    def vectors(self) -> np.ndarray:
        """A view of the float32 rows (valid until the next add)."""
        storage = faiss.downcast_index(self.index.storage) if self.approximate else self.index
        n, d = self.rows, self.index.d
        if n == 0:
            return np.empty((0, d), np.float32)
        return faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d)

    def live_bitmap(self) -> np.ndarray | None:
        """The live rows as a bitmap for ``IDSelectorBitmap``; None when every row is alive."""
        if self.live == self.rows:
            return None
        if self._bitmap is None:
            self._bitmap = np.packbits(self.alive[: self.rows], bitorder="little")
        return self._bitmap


def _writer() -> str:
    """This process among those that may share a snapshot folder (replicas in containers are all pid 1,
    on hosts of their own): its host name and pid, as a file-name prefix."""
    host = "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname())
    return f"{host}-{os.getpid()}-"


def _new_index(dim: int, approximate: bool) -> faiss.Index:
    if not approximate:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    return index


def ef_search(rows: int) -> int:
    """The search breadth for a graph of ``rows``: EF_SEARCH up to 100,000, then growing with the
    logarithm of the size (measured: recall@10 0.9925 at 128 for 100k, 0.993 at 384 for 1M)."""
    return int(EF_SEARCH * max(1.0, 1 + 2 * math.log10(max(rows, 1) / 100_000)))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest ``scores``, highest first."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


class GalleryIndex:
    """Thread-safe: one lock guards every read and write of the FAISS structures.

    ``threads`` caps FAISS's OpenMP threads. OpenMP keeps that setting per OS thread, so it is applied
    in whichever worker thread calls in; one query is memory-bound, and a second OpenMP pool spinning
    next to torch's only steals the cores. Building an HNSW graph (``maintain``, a rebuild at start)
    uses ``build_threads``.
    """

    def __init__(
        self, dim: int, *, threads: int = 1, exact_max: int = EXACT_MAX, build_threads: int | None = None
    ) -> None:
        self.dim = dim
        self.threads = threads
        self.exact_max = exact_max
        self.build_threads = build_threads or os.cpu_count() or 1
        self._lock = threading.Lock()
        self._maintain_lock = threading.Lock()
        self._collections: dict[str, _Collection] = {}
        self._names: list[str] = []  # collection number -> name
        # Entry id -> its collection's number (-1: not held) and its row there: ids are the database's.
        self._collection_of = np.full(0, -1, np.int32)
        self._row_of = np.full(0, -1, np.int64)
        self._camera_codes: dict[str, int] = {}

    # -- bookkeeping --------------------------------------------------------------------------------

    persistent = False  # rebuilt or loaded from a snapshot at every start (Milvus keeps its rows itself)

    def close(self) -> None:
        """Nothing to release (the Milvus index's closes its connection)."""

    def __len__(self) -> int:
        with self._lock:
            return sum(c.live for c in self._collections.values())

    def __contains__(self, entry_id: int) -> bool:
        with self._lock:
            return 0 <= entry_id < len(self._collection_of) and self._collection_of[entry_id] >= 0

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {name: c.live for name, c in self._collections.items()}

    def kinds(self) -> dict[str, str]:
        """{collection: 'exact' or 'hnsw'}: how an unfiltered search of it runs."""
        with self._lock:
            return {name: "hnsw" if c.approximate else "exact" for name, c in self._collections.items()}

    def _number(self, name: str) -> int:
        if name not in self._collections:
            self._collections[name] = _Collection(_new_index(self.dim, False))
            self._names.append(name)
        return self._names.index(name)

    def _held(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are held (a bool mask)."""
        inside = (ids >= 0) & (ids < len(self._collection_of))
        held = np.zeros(len(ids), bool)
        held[inside] = self._collection_of[ids[inside]] >= 0
        return held

    # -- writes -------------------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[int] | np.ndarray,
        collections: Sequence[str],
        vectors: np.ndarray,
        *,
        cameras: Sequence[str | None] | None = None,
        times: Sequence[datetime | None] | None = None,
    ) -> None:
        """Add (or replace) vectors; ``collections[i]``, ``cameras[i]`` and ``times[i]`` (captured_at)
        are those of ``ids[i]`` (no camera and no time when not given)."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        if len(ids) == 0:
            return
        with self._lock:
            faiss.omp_set_num_threads(self.threads)
            codes = np.full(len(ids), -1, np.int32)
            if cameras is not None:
                for position, camera in enumerate(cameras):
                    if camera is not None:
                        codes[position] = self._camera_codes.setdefault(camera, len(self._camera_codes))
            stamps = np.full(len(ids), NO_TIME, np.int64)
            if times is not None:
                stamps[:] = [microseconds(t) for t in times]
            self._remove_locked(ids[self._held(ids)])
            by_collection: dict[str, list[int]] = {}
            for row, name in enumerate(collections):
                by_collection.setdefault(name, []).append(row)
            top = int(ids.max()) + 1
            self._collection_of = _grow(self._collection_of, top, -1)
            self._row_of = _grow(self._row_of, top, -1)
            for name, positions in by_collection.items():
                number = self._number(name)
                fields = (codes[positions], stamps[positions])
                self._append(self._collections[name], number, ids[positions], vectors[positions], *fields)

    def _append(
        self, c: _Collection, number: int, ids: np.ndarray, vectors: np.ndarray, cameras, times
    ) -> None:
        start = c.rows
        c.index.add(vectors)
        c.ids = _grow(c.ids, c.rows, -1)
        c.alive = _grow(c.alive, c.rows, False)
        c.cameras = _grow(c.cameras, c.rows, -1)
        c.times = _grow(c.times, c.rows, NO_TIME)
        c.ids[start : c.rows] = ids
        c.alive[start : c.rows] = True
        c.cameras[start : c.rows] = cameras
        c.times[start : c.rows] = times
        c.live += len(ids)
        c._bitmap = None
        self._collection_of[ids] = number
        self._row_of[ids] = np.arange(start, c.rows)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove ids that are present; returns how many were."""
        with self._lock:
            return self._remove_locked(np.asarray(ids, dtype=np.int64))

    def _remove_locked(self, ids: np.ndarray) -> int:
        ids = np.unique(ids[self._held(ids)])
        for number in np.unique(self._collection_of[ids]).tolist():
            c = self._collections[self._names[number]]
            members = ids[self._collection_of[ids] == number]
            c.alive[self._row_of[members]] = False
            c.live -= len(members)
            c._bitmap = None
        self._collection_of[ids] = -1
        self._row_of[ids] = -1
        return len(ids)

    # -- reads --------------------------------------------------------------------------------------

    def ids(self, collection: str) -> np.ndarray:
        """The ids held for ``collection`` (int64, unordered)."""
        with self._lock:
            c = self._collections.get(collection)
            if c is None:
                return np.empty(0, np.int64)
            return c.ids[: c.rows][c.alive[: c.rows]].copy()

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        """{collection: (size, sum of ids)}, what ``store.searchable_fingerprints`` gives for the rows."""
        with self._lock:
            sums = {
                name: (c.live, int(c.ids[: c.rows][c.alive[: c.rows]].sum()))
                for name, c in self._collections.items()
            }
        return {name: value for name, value in sums.items() if value[0]}

    def vectors(self, collection: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (which must be in ``collection``), in that order; ``KeyError``
        if one was removed (e.g. between a search and this call)."""
        with self._lock:
            c = self._collections[collection]
            rows = self._row_of[np.asarray(ids, dtype=np.int64)]
            if (rows < 0).any():
                raise KeyError(f"entries {np.asarray(ids)[rows < 0].tolist()} are no longer in the index")
            return c.vectors()[rows].copy()

    def select(self, collection: str, filters: Any) -> np.ndarray:
        """Ids of the entries of ``collection`` that meet ``filters`` (a ``store.SearchFilters`` without
        attribute conditions), from the fields held per row: what ``store.matching_ids`` answers from
        the database, without reading hundreds of thousands of ids from it (1M rows: a few ms)."""
        with self._lock:
            c = self._collections.get(collection)
            if c is None:
                return np.empty(0, np.int64)
            return c.ids[: c.rows][self._mask(c, filters)]

    def count(self, collection: str, filters: Any) -> int:
        """How many entries ``select`` admits."""
        with self._lock:
            c = self._collections.get(collection)
            return 0 if c is None else int(np.count_nonzero(self._mask(c, filters)))

    def _mask(self, c: _Collection, filters: Any) -> np.ndarray:
        """The live rows of ``c`` that meet ``filters`` (bool per row)."""
        assert not filters.attributes, "attribute filters are the database's"
        n = c.rows
        keep = c.alive[:n].copy()

        def cameras(names: Sequence[str]) -> np.ndarray:
            table = np.zeros(len(self._camera_codes) + 1, bool)  # the last one: no camera (-1)
            table[[self._camera_codes[x] for x in names if x in self._camera_codes]] = True
            return table[c.cameras[:n]]

        if filters.cameras:
            keep &= cameras(filters.cameras)
        if filters.exclude_cameras:  # (an entry without a camera is not in any excluded one)
            keep &= ~cameras(filters.exclude_cameras)
        if filters.captured_after is not None:
            keep &= c.times[:n] >= microseconds(filters.captured_after)
        if filters.captured_before is not None:
            keep &= (c.times[:n] <= microseconds(filters.captured_before)) & (c.times[:n] != NO_TIME)
        return keep

    def search(
        self,
        collection: str,
        query: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        where: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` (scores, ids) in ``collection``, highest first; only ``allowed`` ids if given, or
        only the entries that meet ``where`` (filters without attribute conditions, as ``select``)."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        empty = np.empty(0, np.float32), np.empty(0, np.int64)
        with self._lock:
            faiss.omp_set_num_threads(self.threads)
            c = self._collections.get(collection)
            if c is None or c.live == 0 or k <= 0:
                return empty
            flags = None
            if where is not None:
                flags = self._mask(c, where)
                rows = np.flatnonzero(flags)
            elif allowed is not None:
                allowed = np.asarray(allowed, dtype=np.int64)
                number = self._names.index(collection)
                allowed = allowed[self._held(allowed)]
                rows = self._row_of[allowed[self._collection_of[allowed] == number]]
            if where is None and allowed is None:
                bitmap, admitted = c.live_bitmap(), c.live
            else:
                if len(rows) == 0:
                    return empty
                if len(rows) * 64 <= c.rows:
                    # Few admitted: score exactly those vectors, gathered.
                    scores = c.vectors()[rows] @ query[0]
                    best = _top(scores, k)
                    return scores[best].astype(np.float32), c.ids[rows[best]]
                admitted = len(rows)
                if flags is None:
                    flags = np.zeros(c.rows, bool)
                    flags[rows] = True
                bitmap = np.packbits(flags, bitorder="little")
                if len(rows) <= self.exact_max or not c.approximate:
                    # Up to exact_max admitted (or a small collection): every row, skipping the others.
                    exhaustive = faiss.downcast_index(c.index.storage) if c.approximate else c.index
                    selector = faiss.IDSelectorBitmap(c.rows, faiss.swig_ptr(bitmap))
                    scores, found = exhaustive.search(
                        query, min(k, admitted), params=faiss.SearchParameters(sel=selector)
                    )
                    keep = found[0] >= 0
                    return scores[0][keep], c.ids[found[0][keep]]
            k = min(k, admitted)
            params = faiss.SearchParametersHNSW() if c.approximate else faiss.SearchParameters()
            if c.approximate:
                # A filter admitting a share f of the rows leaves about f of each neighbourhood: widen.
                share = admitted / max(c.rows, 1)
                params.efSearch = int(min(EF_MAX, max(ef_search(c.rows), k) / max(share, 1e-9)))
            if bitmap is not None:
                selector = faiss.IDSelectorBitmap(c.rows, faiss.swig_ptr(bitmap))
                params.sel = selector
            scores, rows = c.index.search(query, k, params=params)
            keep = rows[0] >= 0
            return scores[0][keep], c.ids[rows[0][keep]]

    # -- maintenance --------------------------------------------------------------------------------

    def _due_locked(self) -> list[str]:
        return [
            name
            for name, c in self._collections.items()
            if (not c.approximate and c.live > self.exact_max)
            or (c.rows > 1000 and c.rows - c.live > COMPACT_DEAD_FRACTION * c.rows)
        ]

    def needs_maintenance(self) -> bool:
        with self._lock:
            return bool(self._due_locked())

    def maintain(self) -> list[str]:
        """Rebuild the collections that need it: past ``exact_max`` entries and still flat (-> HNSW), or
        with more than ``COMPACT_DEAD_FRACTION`` of their rows dead. The graph is built outside the
        lock from a copy of the live rows; writes meanwhile are replayed onto it. Returns the names."""
        with self._maintain_lock:
            with self._lock:
                due = self._due_locked()
            for name in due:
                self._rebuild_collection(name)
            return due

    def _rebuild_collection(self, name: str) -> None:
        with self._lock:
            old = self._collections[name]
            copied = old.rows
            alive = old.alive[:copied].copy()
            vectors = old.vectors()[alive]  # (a copy)
            ids = old.ids[:copied][alive]
            fields = (old.cameras[:copied][alive], old.times[:copied][alive])
        approximate = len(ids) > self.exact_max
        index = _new_index(self.dim, approximate)
        faiss.omp_set_num_threads(self.build_threads)
        try:
            index.add(vectors)
        finally:
            faiss.omp_set_num_threads(self.threads)
        del vectors
        new = _Collection(
            index, ids.copy(), np.ones(len(ids), bool), fields[0].copy(), fields[1].copy(), len(ids)
        )
        with self._lock:
            faiss.omp_set_num_threads(self.threads)
            # Rows copied then removed since, and rows added since (rows only ever append).
            new_row = np.cumsum(alive) - 1
            died = alive & ~old.alive[:copied]
            new.alive[new_row[died]] = False
            new.live -= int(died.sum())
            number = self._names.index(name)
            tail = np.arange(copied, old.rows)
            live_tail = tail[old.alive[tail]]
            if len(live_tail):
                tail_fields = (old.cameras[live_tail], old.times[live_tail])
                self._append(new, number, old.ids[live_tail], old.vectors()[live_tail].copy(), *tail_fields)
            self._collections[name] = new
            held = new.ids[: new.rows][new.alive[: new.rows]]
            self._row_of[held] = np.flatnonzero(new.alive[: new.rows])

    # -- snapshots ----------------------------------------------------------------------------------

    def save(self, folder: Path, meta: dict) -> None:
        """Write every collection and ``meta`` (with the collections' fingerprints) to ``folder``.

        Files of a new generation are written first and the manifest last (``os.replace``), so a reader
        sees the old snapshot or the new one, never half of one; the old generation's files go after."""
        folder.mkdir(parents=True, exist_ok=True)
        mine = _writer()
        generation = f"{mine}{threading.get_ident()}-{os.urandom(4).hex()}"
        collections = []
        with self._lock:
            for number, name in enumerate(self._names):
                c = self._collections[name]
                stem = f"{generation}-{number}"
                faiss.write_index(c.index, str(folder / f"{stem}.faiss"))
                np.save(folder / f"{stem}.ids.npy", c.ids[: c.rows])
                np.save(folder / f"{stem}.alive.npy", c.alive[: c.rows])
                np.save(folder / f"{stem}.cameras.npy", c.cameras[: c.rows])
                np.save(folder / f"{stem}.times.npy", c.times[: c.rows])
                collections.append({"name": name, "stem": stem, "live": c.live})
            fingerprints = {
                name: [c.live, int(c.ids[: c.rows][c.alive[: c.rows]].sum())]
                for name, c in self._collections.items()
            }
            cameras = dict(self._camera_codes)
        manifest = {
            **meta,
            "dim": self.dim,
            "collections": collections,
            "fingerprints": fingerprints,
            "cameras": cameras,
        }
        temporary = folder / f"manifest.{generation}.tmp"
        temporary.write_text(json.dumps(manifest))
        os.replace(temporary, folder / "manifest.json")
        # Older generations go once they are ten minutes old, this process's too: a replica sharing the
        # folder may be loading the generation the manifest named until a moment ago.
        keep = {entry["stem"] for entry in collections}
        for path in folder.iterdir():
            stem = path.name.split(".")[0]
            if path.name == "manifest.json" or stem in keep:
                continue
            try:
                if time.time() - path.stat().st_mtime > 600:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    @classmethod
    def load(cls, folder: Path, dim: int, **kwargs) -> tuple[GalleryIndex, dict]:
        """The index and the manifest saved in ``folder`` (``FileNotFoundError``/``ValueError`` if none
        or unreadable). The caller checks the manifest's position and fingerprints."""
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("dim") != dim:
            raise ValueError(f"snapshot is {manifest.get('dim')}-d, the bundle {dim}-d")
        index = cls(dim, **kwargs)
        top = 0
        loaded = []
        for entry in manifest["collections"]:
            stem = entry["stem"]
            faiss_index = faiss.read_index(str(folder / f"{stem}.faiss"))
            ids = np.load(folder / f"{stem}.ids.npy")
            alive = np.load(folder / f"{stem}.alive.npy")
            cameras = np.load(folder / f"{stem}.cameras.npy")
            times = np.load(folder / f"{stem}.times.npy")
            sizes = {faiss_index.ntotal, len(ids), len(alive), len(cameras), len(times)}
            if len(sizes) != 1 or faiss_index.d != dim:
                raise ValueError(f"snapshot collection {entry['name']!r} is inconsistent")
            c = _Collection(
                faiss_index,
                ids.astype(np.int64),
                alive.astype(bool),
                cameras.astype(np.int32),
                times.astype(np.int64),
                int(alive.sum()),
            )
            if isinstance(faiss_index, faiss.IndexHNSW):
                c.index.hnsw.efSearch = EF_SEARCH
            loaded.append((entry["name"], c))
            if len(ids):
                top = max(top, int(ids.max()) + 1)
        index._collection_of = np.full(top, -1, np.int32)
        index._row_of = np.full(top, -1, np.int64)
        index._camera_codes = {str(k): int(v) for k, v in manifest.get("cameras", {}).items()}
        for number, (name, c) in enumerate(loaded):
            index._collections[name] = c
            index._names.append(name)
            rows = np.flatnonzero(c.alive)
            index._collection_of[c.ids[rows]] = number
            index._row_of[c.ids[rows]] = rows
        return index, manifest
