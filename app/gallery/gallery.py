"""The gallery: enrollment, search and deletion over the database (truth) and the index (derived:
FAISS in the process, or Milvus, ``app.gallery.backends``).

Guarantees, for every process that serves a database (replicas):

- A write is committed to the database, with its row in the change log, before the index sees it; a
  crash in between loses nothing: at start the index is loaded from its snapshot (or rebuilt from the
  database) and caught up from the change log.
- The process that took a write updates its index at once; every other one reads the change log about
  once a second (``sync_index``) and applies what changed.
- Writes (commit, then index update) run one at a time under a lock, so the index always equals the
  committed searchable rows; SQLite therefore never sees two writers at once. Inference for a write
  runs before the lock is taken.
- Only entries made by the loaded re-ID bundle are in the index; others are kept and reported.
- The same image bytes enrolled twice in one collection give one entry (a unique constraint backs
  this up across processes).
- A committed entry missing from the index (its index update failed after the commit, or another
  process wrote it) joins the index when the same bytes are enrolled again, from its stored embedding.

Everything here is synchronous; the API runs it in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from threadpoolctl import ThreadpoolController

from app.gallery import store
from app.gallery.backends import build_index
from app.gallery.index import EXACT_MAX, GalleryIndex
from app.gallery.store import EntryRecord, NewEntry, SearchFilters
from app.inference import Models
from app.metrics import ServiceMetrics
from app.retrieval import QE_ALPHA, augment_then_expand, expand_queries, rescore_pool

if TYPE_CHECKING:
    from app.bundle import GallerySideSpec
    from app.gallery.milvus_index import MilvusIndex

log = logging.getLogger(__name__)
PRUNE_SECONDS = 3600.0  # how often a replica prunes the change log
SCORE_DECIMALS = 6  # scores are returned rounded to this; min_score compares the rounded value

GroupBy = Literal["entry", "identity"]
EnrollStatus = Literal["created", "existing", "refreshed"]


@dataclass
class Crop:
    """One uploaded image: its position in the request, the sha256 of its bytes, the decoded pixels,
    and the bytes themselves with their content type (kept as the entry's crop)."""

    index: int
    sha256: str
    image: Image.Image
    data: bytes | None = None
    content_type: str = "application/octet-stream"


@dataclass
class EntryFields:
    """What the client says about the crops of one enrollment request."""

    identity: str | None = None
    camera_id: str | None = None
    track_id: str | None = None
    captured_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Enrolled(EntryRecord):
    """The result of enrolling one crop: its entry, the crop's position in the request, and whether the
    entry was created, already there with these bytes, or there but re-embedded with the loaded bundle."""

    index: int
    status: EnrollStatus


@dataclass
class CollectionCounts:
    """Entries of one collection: searchable ones, and those of each other re-ID bundle version."""

    entries: int = 0
    searchable: int = 0
    other_versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GalleryCounts:
    """What ``Gallery.stats`` reports (the fields of the API's ``GalleryStats``)."""

    model_version: str
    embedding_dim: int
    entries: int
    searchable: int
    excluded_other_versions: dict[str, int]
    index_size: int
    collections: dict[str, CollectionCounts]
    stored_images: int  # entries whose crop is kept
    outdated: int  # entries made by another re-ID or attribute bundle (what re-embedding would redo)
    outdated_without_image: int  # of those, entries with no stored crop: re-embedding cannot redo them


def _enrolled(record: EntryRecord, status: EnrollStatus) -> Enrolled:
    return Enrolled(**vars(record), index=0, status=status)


def _created(entry_id: int, collection: str, item: NewEntry, version: str, created_at: datetime) -> Enrolled:
    """The result of a row just inserted, from the values inserted (no read back)."""
    record = EntryRecord(
        id=entry_id,
        collection=collection,
        identity=item.identity,
        camera_id=item.camera_id,
        track_id=item.track_id,
        captured_at=store.as_utc(store.utc_naive(item.captured_at)),
        metadata=item.metadata,
        attributes={k: {"value": v, "score": sc} for k, (v, sc) in item.attributes.items()},
        image_sha256=item.image_sha256,
        model_version=version,
        searchable=True,
        created_at=created_at.replace(tzinfo=UTC),
        image_url=store.image_url(entry_id, item.image is not None),
    )
    return _enrolled(record, "created")


def numpy_blas_on_one_thread() -> None:
    """Put numpy's BLAS (not FAISS's, which sets its threads per search) on one thread for the rest of
    the process. The gallery's numpy products are small (the augmentation's 500 x 500), and BLAS threads
    spinning beside ONNX Runtime's doubled the query's p50 (25 ms against 13 at 10k entries,
    docs/service.md); limiting them per query instead churned OpenBLAS's threads."""
    controller = ThreadpoolController()
    numpy_blas = [
        lib["filepath"]
        for lib in controller.info()
        if lib["user_api"] == "blas" and "faiss" not in lib["filepath"]
    ]
    controller.select(filepath=numpy_blas).limit(limits=1)


class Gallery:
    def __init__(
        self,
        engine: Engine,
        models: Models,
        *,
        metrics: ServiceMetrics | None = None,
        search_threads: int = 1,
        query_expansion: int | None = None,
        gallery_side: bool = True,
        store_images: bool = True,
        snapshot_dir: Path | None = None,
        exact_max: int = EXACT_MAX,
        snapshot_seconds: float = 3600.0,
        build_threads: int | None = None,
        vector_backend: str = "faiss",
        milvus_uri: str | None = None,
        milvus_token: str | None = None,
        change_log_days: float = 7.0,
    ) -> None:
        self.engine = engine
        self.store_images = store_images
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.models = models
        self.metrics = metrics
        self.search_threads = search_threads
        self.exact_max = exact_max
        self.build_threads = build_threads  # FAISS threads building an HNSW graph; None: every core
        # One snapshot folder, and one Milvus collection, per database and re-ID bundle: an index only
        # ever meets the rows it came from.
        url = make_url(str(engine.url)).render_as_string(hide_password=True)
        self.database_key = hashlib.sha256(url.encode()).hexdigest()[:12]
        self.vector_backend = vector_backend
        self.milvus_uri, self.milvus_token = milvus_uri, milvus_token
        self.index: GalleryIndex | MilvusIndex = self._new_index()
        self._write_lock = threading.Lock()
        # The change log's id that the index reflects, and the log ids of this process's own writes
        # (already in the index when the poll reaches them).
        self.position = 0
        self._own: set[int] = set()
        self.started_from: Literal["snapshot", "rebuilt", "verified", "repaired"] | None = None
        self.change_log_days = change_log_days  # its rows are kept this long (0: for ever)
        self._pruned_at: float | None = None  # when this process last pruned it
        self.gap_rebuilds = 0  # rebuilds because the log had been pruned past the index's position
        self.snapshot_seconds = snapshot_seconds
        self.snapshot_dir = None
        if snapshot_dir is not None and not self.index.persistent:  # (Milvus keeps its own rows)
            self.snapshot_dir = Path(snapshot_dir) / f"{models.reid.version}-{self.database_key}"
        self._snapshot_at = (time.monotonic(), 0)  # when, at which position
        self._maintenance: threading.Thread | None = None
        spec = models.reid.manifest.query_expansion
        # Neighbours of query expansion (0: off), and the threshold that fits the scores it gives.
        self.expansion = query_expansion if query_expansion is not None else (spec.neighbours if spec else 0)
        self.expanded_threshold = spec.match_threshold if spec else models.reid.match_threshold
        self.expansion_alpha = spec.alpha if spec else QE_ALPHA  # the weights it was validated with
        # Gallery-side rescoring of the expanded query's shortlist, where the manifest validated it.
        self.gallery_side = spec.gallery_side if spec and gallery_side and self.expansion else None
        if self.gallery_side is not None and models.reid.runtime.name == "onnx":
            numpy_blas_on_one_thread()  # (with torch's runtime it made queries slower: docs/service.md)
        if self.expansion and spec is None:
            log.warning(
                "query expansion is on but %s has no calibrated threshold for it: is_match uses the plain "
                "one (record one with `reid-train evaluate-reid BUNDLE --record`)",
                models.reid.name,
            )

    @classmethod
    def open(cls, url: str, models: Models, **options: Any) -> Gallery:
        """Connect, create or migrate the schema, and load the index (``start``); ``options`` are the
        constructor's keyword arguments."""
        engine = store.open_engine(url)
        store.prepare_schema(engine)
        gallery = cls(engine, models, **options)
        try:
            gallery.start()
        except BaseException:
            gallery.index.close()
            engine.dispose()
            raise
        return gallery

    def close(self) -> None:
        """Wait a moment for a rebuild in progress, write a snapshot if anything changed since the last
        one, and disconnect."""
        if self._maintenance is not None:  # a graph being built: the next start builds it again
            self._maintenance.join(timeout=5)
        try:
            if self.snapshot_dir is not None:
                self.catch_up()
                if self._snapshot_at[1] != self.position:
                    self.save_snapshot()
        except Exception:  # a full disk must not stop the shutdown; the next start rebuilds
            log.exception("could not write the index snapshot")
        self.index.close()
        self.engine.dispose()

    def _new_index(self) -> GalleryIndex | MilvusIndex:
        """An index of the configured backend (``app.gallery.backends``)."""
        from app.gallery.milvus_index import collection_name

        return build_index(
            self.vector_backend,
            self.models.reid.dim,
            threads=self.search_threads,
            exact_max=self.exact_max,
            build_threads=self.build_threads,
            uri=self.milvus_uri,
            token=self.milvus_token,
            name=collection_name(self.model_version, self.database_key),
        )

    @property
    def model_version(self) -> str:
        return self.models.reid.version

    def rebuild(self) -> int:
        """Replace the index with one built from every searchable row; returns its size."""
        start = time.perf_counter()
        persistent = self.index.persistent
        index = self.index if persistent else self._new_index()
        with self._write_lock:
            # Milvus is refilled in place and shared with the other replicas, which go on searching it:
            # every row is written again (an upsert), and only then are the ids it held before that the
            # database no longer has removed. Ids another replica adds meanwhile are not among those.
            before = self._held_ids() if persistent else np.empty(0, np.int64)
            written = []
            with self.sessions() as session:
                # The position first: changes committed after it are applied again by the catch-up
                # below, which reads their current rows (applying a change twice changes nothing).
                position = store.change_position(session)
                for rows in store.iter_embeddings(session, model_version=self.model_version, dim=index.dim):
                    fields = {"cameras": rows.cameras, "times": rows.times}
                    index.add(rows.ids, rows.collections, rows.vectors, **fields)
                    written.append(rows.ids)
            if persistent:
                index.remove(np.setdiff1d(before, np.concatenate([np.empty(0, np.int64), *written])))
            index.maintain()  # large collections get their HNSW graph
            self.index, self.position = index, position
            self._own.clear()
        log.info("gallery index built: %d entries in %.2fs", len(index), time.perf_counter() - start)
        self.catch_up()
        return len(index)

    def _held_ids(self) -> np.ndarray:
        """Every id the (persistent) index holds now, read again from it."""
        self.index.reload()
        return np.concatenate([np.empty(0, np.int64), *(self.index.ids(c) for c in self.index.sizes())])

    # -- start-up, snapshots and the change log -----------------------------------------------------

    def start(self) -> str:
        """Load the index from its snapshot, catch it up from the change log and check it against the
        database (count and id sum per collection); rebuild it when there is no usable snapshot or it
        disagrees. Returns how it started: 'snapshot' or 'rebuilt' (for Milvus: 'verified', see
        ``start_persistent``)."""
        if self.index.persistent:
            return self.start_persistent()
        start = time.perf_counter()
        if self.snapshot_dir is not None and (self.snapshot_dir / "manifest.json").exists():
            try:
                index, manifest = GalleryIndex.load(
                    self.snapshot_dir,
                    self.models.reid.dim,
                    threads=self.search_threads,
                    exact_max=self.exact_max,
                    build_threads=self.build_threads,
                )
                if manifest.get("model_version") != self.model_version:
                    raise ValueError(f"snapshot of {manifest.get('model_version')}")
            except Exception as exc:
                log.warning("index snapshot in %s unusable (%s): rebuilding", self.snapshot_dir, exc)
            else:
                with self.sessions() as session:
                    stale = store.pruned_after(session, position=int(manifest["position"]))
                if stale:
                    log.warning("index snapshot older than the change log's retention: rebuilding")
                else:
                    with self._write_lock:
                        self.index, self.position = index, int(manifest["position"])
                        self._own.clear()
                    self._snapshot_at = (time.monotonic(), self.position)
                    caught_up = self.catch_up()
                    if self.verify():
                        self.started_from = "snapshot"
                        log.info(
                            "gallery index loaded from its snapshot at change %d and caught up (%d "
                            "changes): %d entries in %.2fs",
                            manifest["position"],
                            caught_up,
                            len(self.index),
                            time.perf_counter() - start,
                        )
                        self._maintain_in_background()
                        return self.started_from
                    log.warning("index snapshot disagrees with the database after catching up: rebuilding")
        self.rebuild()
        self.started_from = "rebuilt"
        if self.snapshot_dir is not None:
            try:
                self.save_snapshot()
            except OSError as exc:
                log.warning("could not write the index snapshot to %s: %s", self.snapshot_dir, exc)
        return self.started_from

    def start_persistent(self, attempts: int = 3) -> str:
        """Start on an index that keeps its rows itself (Milvus): read the ids it holds, compare them
        with the database's searchable rows per collection, add the missing ones (from their stored
        embeddings) and remove the extra ones, catch up from the change log and verify (Milvus's own
        row count too). Replicas writing meanwhile can make the check fail once: it is repeated up to
        ``attempts`` times. Returns 'verified' (nothing to repair), 'repaired', or 'rebuilt' (still
        disagreeing: emptied and refilled from the database)."""
        start = time.perf_counter()
        added = removed = caught_up = 0
        for _ in range(attempts):
            missing, extra = self._repair_persistent()
            added, removed = added + missing, removed + extra
            caught_up += self.catch_up()
            if self.index.stored_count() == len(self.index) and self.verify():
                self.started_from = "repaired" if added or removed else "verified"
                break
        else:
            log.warning("%s disagrees with the database after repairing: refilling it", self.vector_backend)
            self.rebuild()
            self.started_from = "rebuilt"
        log.info(
            "gallery index on %s: %d entries, %d added and %d removed to match the database, %d changes "
            "caught up, in %.2fs",
            self.vector_backend,
            len(self.index),
            added,
            removed,
            caught_up,
            time.perf_counter() - start,
        )
        return self.started_from

    def _repair_persistent(self, batch: int = 5000) -> tuple[int, int]:
        """Make the index hold the database's searchable ids, read at a change-log position that
        ``position`` is then set to (the catch-up re-applies what was committed after it). Returns how
        many ids were (missing, extra)."""
        version, dim = self.model_version, self.models.reid.dim
        with self._write_lock:
            with self.sessions() as session:
                position = store.change_position(session)  # first: later changes are caught up
                names = set(store.searchable_fingerprints(session, model_version=version))
                wanted = {
                    c: store.searchable_ids(session, collection=c, model_version=version) for c in names
                }
            self.index.reload()
            held = {c: self.index.ids(c) for c in self.index.sizes()}
            none = [np.empty(0, np.int64)]
            missing = np.concatenate(
                [np.setdiff1d(ids, held.get(c, []), assume_unique=True) for c, ids in wanted.items()] or none
            )
            extra = np.concatenate(
                [np.setdiff1d(ids, wanted.get(c, []), assume_unique=True) for c, ids in held.items()] or none
            )
            self.index.remove(extra)
            for first in range(0, len(missing), batch):
                with self.sessions() as session:
                    chunk = missing[first : first + batch].tolist()
                    rows = store.current_embeddings(session, ids=chunk, model_version=version, dim=dim)
                fields = {"cameras": rows.cameras, "times": rows.times}
                self.index.add(rows.ids, rows.collections, rows.vectors, **fields)
            self.position = position
            self._own.clear()
        return len(missing), len(extra)

    def verify(self, attempts: int = 5) -> bool:
        """Whether the index holds exactly the searchable rows (count and id sum per collection), read
        at the change-log position it reflects; a change committed meanwhile by another process makes
        it catch up and look again."""
        version = self.model_version
        for _ in range(attempts):
            with self._write_lock, self.sessions() as session:
                if session.get_bind().dialect.name == "postgresql":  # both reads from one snapshot
                    session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                position = store.change_position(session)
                wanted = store.searchable_fingerprints(session, model_version=version)
                # SQLite reads the two in separate statements: a write between them is another round
                settled = store.change_position(session) == position
                if position == self.position and settled:
                    return wanted == self.index.fingerprints()
            self.catch_up()
        return False

    def catch_up(self, batch: int = 5000) -> int:
        """Apply the change log after ``position`` to the index: each entry named there is read as it is
        now, and added (or replaced) when searchable, removed otherwise. Returns how many were applied.

        When changes after ``position`` were pruned from the log (a snapshot, or a replica, older than
        the log's retention) the index cannot be caught up: it is rebuilt from the database."""
        applied, gap = self._apply_changes(batch)
        if gap:
            log.warning(
                "the change log no longer holds the changes after position %d (pruned): rebuilding the "
                "index from the database",
                self.position,
            )
            self.gap_rebuilds += 1
            if self.metrics is not None:
                self.metrics.change_log_gaps.inc()
            applied += self.rebuild()
        return applied

    def _apply_changes(self, batch: int) -> tuple[int, bool]:
        """``catch_up``'s work: (entries applied, whether the log has a gap after ``position``)."""
        version, dim = self.model_version, self.models.reid.dim
        applied = 0
        with self._write_lock, self.sessions() as session:
            while True:
                changes = store.changes_after(session, position=self.position, limit=batch)
                if not changes:
                    break
                if changes[0][0] > self.position + 1 and store.pruned_after(session, position=self.position):
                    return applied, True
                ids = sorted({entry for log_id, entry in changes if log_id not in self._own})
                self._own.difference_update(log_id for log_id, _ in changes)
                if ids:
                    rows = store.current_embeddings(session, ids=ids, model_version=version, dim=dim)
                    self.index.remove(np.setdiff1d(np.asarray(ids, np.int64), rows.ids))
                    self.index.add(
                        rows.ids, rows.collections, rows.vectors, cameras=rows.cameras, times=rows.times
                    )
                    applied += len(ids)
                self.position = changes[-1][0]
                if len(changes) < batch:
                    break
        return applied, False

    def prune_change_log(self) -> int:
        """Delete the change log's rows older than ``change_log_days`` (none when it is 0); returns how
        many. Any replica may run it: every one keeps its position current within seconds, and one
        that was away longer than that (or a snapshot that old) rebuilds its index (``catch_up``)."""
        if not self.change_log_days:
            return 0
        before = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=self.change_log_days)
        pruned, batch = 0, 50_000
        while True:  # short transactions: writers wait on the log's lock for one batch at most
            with self.sessions.begin() as session:
                done = store.prune_changes(session, before=before, limit=batch)
            pruned += done
            if done < batch:
                break
        self._pruned_at = time.monotonic()
        if pruned:
            log.info("change log: %d changes older than %g days pruned", pruned, self.change_log_days)
        return pruned

    def _logged(self, session: Session, ids: Sequence[int], kind: str) -> list[int]:
        return store.log_changes(session, entry_ids=ids, kind=kind)

    def _index_write(self, log_ids: Sequence[int], write: Callable[[], None]) -> None:
        """Apply a committed change to the index (under the write lock). The database holds it, so an
        index that refuses it (Milvus away, memory short) fails no request: the change stays unapplied
        in the log, and the poll (``sync_index``) applies it once the index takes writes again."""
        try:
            write()
        except Exception:
            log.exception(
                "the %s index refused a committed change; the change log's poll applies it later",
                self.vector_backend,
            )
            if self.metrics is not None:
                self.metrics.index_write_failures.inc()
        else:
            self._applied(log_ids)

    def _applied(self, log_ids: Sequence[int]) -> None:
        """Note this process's own changes, committed and in the index (under the write lock)."""
        if len(self._own) > 100_000:  # the poll is off: forget them (the catch-up re-reads them)
            self._own.clear()
        self._own.update(log_ids)

    def save_snapshot(self) -> Path | None:
        """Write the index with the change-log position it reflects to ``snapshot_dir``."""
        if self.snapshot_dir is None:
            return None
        start = time.perf_counter()
        self.catch_up()  # the position past this process's own writes (and anyone's, while at it)
        with self._write_lock:
            meta = {"position": self.position, "model_version": self.model_version, "saved_at": time.time()}
            self.index.save(self.snapshot_dir, meta)
            self._snapshot_at = (time.monotonic(), self.position)
        log.info(
            "index snapshot written to %s at change %d in %.2fs",
            self.snapshot_dir,
            meta["position"],
            time.perf_counter() - start,
        )
        return self.snapshot_dir

    def _maintain_in_background(self) -> None:
        """Build HNSW graphs and compact collections (``GalleryIndex.maintain``) in a thread of its own,
        then write a snapshot when one is due."""
        if self._maintenance is not None and self._maintenance.is_alive():
            return

        def run() -> None:
            try:
                rebuilt = self.index.maintain()
                when, position = self._snapshot_at
                due = time.monotonic() - when >= self.snapshot_seconds and position != self.position
                if self.snapshot_dir is not None and (rebuilt or due):
                    self.save_snapshot()
            except Exception:
                log.exception("index maintenance failed")

        self._maintenance = threading.Thread(target=run, name="gallery-index-maintenance", daemon=True)
        self._maintenance.start()

    # -- enrollment ---------------------------------------------------------------------------------

    def _compute(self, crops: Sequence[Crop], fields: EntryFields) -> dict[str, NewEntry]:
        images = [c.image for c in crops]
        attributes = self.models.attributes.predict(images) if images else []
        embeddings = self.models.reid.embed(images) if images else np.empty((0, self.models.reid.dim))
        return {
            crop.sha256: NewEntry(
                image_sha256=crop.sha256,
                embedding=embeddings[i],
                attributes={k: (v.value, v.score) for k, v in attributes[i].items()},
                identity=fields.identity,
                camera_id=fields.camera_id,
                track_id=fields.track_id,
                captured_at=fields.captured_at,
                metadata=fields.metadata,
                image=crop.data if self.store_images else None,
                content_type=crop.content_type,
            )
            for i, crop in enumerate(crops)
        }

    def enroll(self, *, collection: str, crops: Sequence[Crop], fields: EntryFields) -> list[Enrolled]:
        """Enroll crops (idempotent per image sha256 and collection); one result per crop, in order."""
        version = self.model_version
        first: dict[str, Crop] = {}
        for crop in crops:
            first.setdefault(crop.sha256, crop)
        with self.sessions() as session:
            known = store.entries_by_sha(session, collection=collection, digests=list(first))
            current = {d for d, e in known.items() if e.model_version == version}
        computed = self._compute([c for d, c in first.items() if d not in current], fields)
        for attempt in range(3):
            try:
                results = self._write_enrollment(collection, first, computed, fields)
                break
            except IntegrityError:  # another process enrolled the same bytes at the same moment
                if attempt == 2:
                    raise
        return [replace(results[crop.sha256], index=crop.index) for crop in crops]

    def _write_enrollment(
        self,
        collection: str,
        first: dict[str, Crop],
        computed: dict[str, NewEntry],
        fields: EntryFields,
    ) -> dict[str, Enrolled]:
        version = self.model_version
        attribute_version = self.models.attributes.version
        with self._write_lock:
            with self.sessions.begin() as session:
                known = store.entries_by_sha(session, collection=collection, digests=list(first))
                # Rare: an entry seen a moment ago was deleted (or re-embedded elsewhere) since.
                missing = [
                    c
                    for d, c in first.items()
                    if d not in computed and (d not in known or known[d].model_version != version)
                ]
                computed.update(self._compute(missing, fields))
                kwargs = {"model_version": version, "attribute_model_version": attribute_version}
                new = [d for d in first if d not in known]
                ids, created_at = store.add_entries(
                    session, collection=collection, items=[computed[d] for d in new], **kwargs
                )
                results = {
                    d: _created(entry_id, collection, computed[d], version, created_at)
                    for d, entry_id in zip(new, ids, strict=True)
                }
                # (id, embedding, camera, captured_at) of every entry the index is to hold anew
                changed = [
                    (entry_id, computed[d].embedding, computed[d].camera_id, computed[d].captured_at)
                    for d, entry_id in zip(new, ids, strict=True)
                ]
                stored = store.with_image(session, ids=[entry.id for entry in known.values()])
                if self.store_images:
                    # Entries enrolled before crops were kept (or while REID_STORE_IMAGES was off) keep
                    # theirs from now on: the same bytes, so the entry is otherwise unchanged.
                    keep: dict[int, tuple[str, bytes]] = {}
                    for digest, entry in known.items():
                        data = first[digest].data
                        if entry.id not in stored and data is not None:
                            keep[entry.id] = (first[digest].content_type, data)
                    store.add_images(session, images=keep)
                    stored |= set(keep)
                # Searchable but not in the index (its index update failed after the commit, or another
                # process wrote it): enrolling the same bytes again adds its stored embedding, rather than
                # answer 'existing' for an entry no search can find. Taken before the refreshes below
                # make their entries current (those join the index with their new embedding).
                unindexed = [
                    e.id for e in known.values() if e.model_version == version and e.id not in self.index
                ]
                refreshed: list[int] = []
                for digest, entry in known.items():
                    status: EnrollStatus = "existing"
                    if entry.model_version != version:
                        store.refresh_entry(session, entry=entry, item=computed[digest], **kwargs)
                        vector = computed[digest].embedding
                        changed.append((entry.id, vector, entry.camera_id, entry.captured_at))
                        refreshed.append(entry.id)
                        status = "refreshed"
                    record = store.entry_record(entry, model_version=version, has_image=entry.id in stored)
                    results[digest] = _enrolled(record, status)
                repaired: list[int] = []
                if unindexed:
                    found, kept = store.embeddings_of(
                        session, ids=unindexed, model_version=version, dim=self.models.reid.dim
                    )
                    repaired = found.tolist()
                    by_id = {e.id: e for e in known.values()}
                    changed += [
                        (i, v, by_id[i].camera_id, by_id[i].captured_at)
                        for i, v in zip(repaired, kept, strict=True)
                    ]
                logged = self._logged(session, ids, "added") + self._logged(session, refreshed, "reembedded")
            # Committed: only now does the index see the new rows.
            if changed:
                entry_ids, vectors, cameras, times = zip(*changed, strict=True)
                self._index_write(
                    logged,
                    lambda: self.index.add(
                        np.array(entry_ids),
                        [collection] * len(entry_ids),
                        np.stack(vectors),
                        cameras=cameras,
                        times=times,
                    ),
                )
            else:
                self._applied(logged)
            if repaired:
                log.warning("entries %s were in the database but not in the index; added", repaired)
        return results

    # -- search -------------------------------------------------------------------------------------

    def search(
        self,
        *,
        collection: str,
        images: Sequence[Image.Image],
        top_k: int,
        filters: SearchFilters,
        min_score: float | None = None,
        group_by: GroupBy = "entry",
        expand: bool = True,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Search with one crop, or with several crops of one person (a track): their embeddings are
        averaged into one query, which sees the person from more than one view."""
        embeddings = self.models.reid.embed(list(images))
        vector = embeddings.mean(axis=0)
        vector /= max(float(np.linalg.norm(vector)), 1e-12)
        return self.search_vector(
            collection=collection,
            vector=vector,
            top_k=top_k,
            filters=filters,
            min_score=min_score,
            group_by=group_by,
            expand=expand,
        )

    def query_settings(self, expand: bool = True) -> tuple[int, float | None]:
        """(query-expansion neighbours, match threshold) that a search with ``expand`` uses."""
        if expand and self.expansion:
            if self.gallery_side is not None:
                return self.expansion, self.gallery_side.match_threshold
            return self.expansion, self.expanded_threshold
        return 0, self.models.reid.match_threshold

    def search_vector(
        self,
        *,
        collection: str,
        vector: np.ndarray,
        top_k: int,
        filters: SearchFilters,
        min_score: float | None = None,
        group_by: GroupBy = "entry",
        expand: bool = True,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(number of candidates after filters, best matches highest first).

        With query expansion on (and ``expand``), the query takes in its nearest neighbours among the
        entries the filters admit (``app.retrieval``); scores are then similarities to the expanded
        query, judged by the threshold validated for them. Where the bundle validated gallery-side
        augmentation too, the query's top ``shortlist`` entries are augmented with their own
        neighbourhoods among its top ``pool`` and rescored, the others scored for the expanded query,
        and all re-sorted (what validation measured; ``_rescored``): in the manifest's order, before
        the query is expanded with the augmented entries (``app.retrieval.augment_then_expand``) or
        after it was expanded with raw ones (``app.retrieval.rescore_pool``).

        Matches are plain dicts with the fields of ``app.api.bodies.Match``: the API serialises them in one
        call rather than building a model per match and per attribute (top_k=1000 costs 12k objects).
        """
        start = time.perf_counter()
        with self.sessions() as session:
            allowed, where = None, None
            if filters.empty:
                candidates = self.index.sizes().get(collection, 0)
            elif filters.attributes:
                allowed = store.matching_ids(
                    session, collection=collection, model_version=self.model_version, filters=filters
                )
                candidates = len(allowed)
            else:  # camera and time: from the fields the index holds per row, not the database
                where = filters
                candidates = self.index.count(collection, filters)
            neighbours, threshold = self.query_settings(expand)
            rescore = self.gallery_side if expand and neighbours else None
            # "augment_first" expands the query inside the rescoring, with augmented entries
            if neighbours and (rescore is None or rescore.order == "expand_first"):
                sims, near = self.index.search(collection, vector, neighbours, allowed=allowed, where=where)
                try:
                    stacked = self.index.vectors(collection, near) if len(near) else None
                except KeyError:  # a neighbour deleted since the search: rank with the plain query
                    stacked = None
                if stacked is not None:
                    vector = expand_queries(
                        vector[None], stacked[None], sims[None], alpha=self.expansion_alpha
                    )[0]
            k = top_k if group_by == "entry" else 4 * top_k
            while True:
                fetch = max(k, rescore.pool) if rescore is not None else k
                scores, ids = self.index.search(collection, vector, fetch, allowed=allowed, where=where)
                if rescore is not None:
                    search = partial(self.index.search, collection, k=fetch, allowed=allowed, where=where)
                    scores, ids = self._rescored(collection, vector, scores, ids, rescore, search)
                scores, ids = scores[:k], ids[:k]
                if min_score is not None:
                    # Compare the scores as returned (rounded), so that a score read off one response
                    # and sent back as min_score keeps every entry that showed it.
                    keep = np.array([round(float(s), SCORE_DECIMALS) >= min_score for s in scores], bool)
                    scores, ids = scores[keep], ids[keep]
                rows = store.match_rows(session, ids=ids.tolist())
                hits = [(float(s), rows[i]) for s, i in zip(scores, ids.tolist(), strict=True) if i in rows]
                if group_by == "entry":
                    break
                seen: set[object] = set()
                grouped = []
                for score, row in hits:
                    key = row["identity"] if row["identity"] is not None else ("entry", row["entry_id"])
                    if key not in seen:
                        seen.add(key)
                        grouped.append((score, row))
                exhausted = len(ids) < k or k >= candidates
                if len(grouped) >= top_k or exhausted:
                    hits = grouped
                    break
                k *= 4
        matches = [
            {
                **row,
                "score": round(score, SCORE_DECIMALS),
                "is_match": threshold is not None and score >= threshold,
            }
            for score, row in hits[:top_k]
        ]
        if self.metrics is not None:
            self.metrics.search.observe(time.perf_counter() - start)
        return candidates, matches

    def _rescored(
        self,
        collection: str,
        vector: np.ndarray,
        scores: np.ndarray,
        ids: np.ndarray,
        spec: GallerySideSpec,
        search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """``ids`` (the query's best entries, best first) ranked as validation ranks them
        (``app.retrieval.rescore_shortlists``): the first ``spec.shortlist`` by their gallery-side
        augmented scores (neighbours from the first ``spec.pool``), the others by similarity to the
        expanded query, all sorted together. The work is bounded by the pool whatever ``top_k`` asks
        (a 4 x top_k identity search once built a product of its square). Unchanged if an entry was
        deleted meanwhile."""
        if len(ids) == 0:
            return scores, ids
        head = ids[: spec.pool]
        try:
            pool = self.index.vectors(collection, head)
        except KeyError:  # an entry deleted since the search: keep the search's ranking
            return scores, ids
        options = {
            "shortlist": spec.shortlist,
            "neighbours": spec.neighbours,
            "alpha": spec.alpha,
            "weight": spec.weight,
        }
        if spec.order == "augment_first":
            vector, new = augment_then_expand(
                vector, pool, expansion=self.expansion, expansion_alpha=self.expansion_alpha, **options
            )
            if len(ids) > len(new):  # the others, as the query now expanded ranks them
                scores, ids = search(vector)
        else:
            new = rescore_pool(vector, pool, **options)
        shortlist = head[: len(new)]
        others = ~np.isin(ids, shortlist)
        merged = np.concatenate([new, scores[others]]).astype(np.float32)
        order = np.argsort(-merged, kind="stable")
        return merged[order], np.concatenate([shortlist, ids[others]])[order]

    # -- deletion -----------------------------------------------------------------------------------

    def delete(self, entry_id: int) -> bool:
        with self._write_lock:
            with self.sessions.begin() as session:
                if store.get_entry(session, entry_id=entry_id) is None:
                    return False
                store.delete_entries(session, ids=[entry_id])
                logged = self._logged(session, [entry_id], "removed")
            self._index_write(logged, lambda: self.index.remove([entry_id]))
        return True

    def erase_identity(self, *, collection: str, identity: str) -> list[int]:
        """Delete every entry of ``identity`` in ``collection``; returns their ids."""
        with self._write_lock:
            with self.sessions.begin() as session:
                ids = store.identity_entry_ids(session, collection=collection, identity=identity)
                store.delete_entries(session, ids=ids)
                logged = self._logged(session, ids, "removed")
            self._index_write(logged, lambda: self.index.remove(ids))
        return ids

    # -- reporting ----------------------------------------------------------------------------------

    def stats(self) -> GalleryCounts:
        """Entry counts per collection and in all; entries of other re-ID bundle versions apart."""
        version = self.model_version
        with self.sessions() as session:
            rows = store.counts(session)
            stored_images = store.stored_image_count(session)
            outdated, outdated_without_image = store.count_outdated(
                session, model_version=version, attribute_model_version=self.models.attributes.version
            )
        collections: dict[str, CollectionCounts] = {}
        others: dict[str, int] = {}
        for name, model_version, n in rows:
            c = collections.setdefault(name, CollectionCounts())
            c.entries += n
            if model_version == version:
                c.searchable += n
            else:
                c.other_versions[model_version] = c.other_versions.get(model_version, 0) + n
                others[model_version] = others.get(model_version, 0) + n
        return GalleryCounts(
            model_version=version,
            embedding_dim=self.models.reid.dim,
            entries=sum(c.entries for c in collections.values()),
            searchable=sum(c.searchable for c in collections.values()),
            excluded_other_versions=others,
            index_size=len(self.index),
            collections=collections,
            stored_images=stored_images,
            outdated=outdated,
            outdated_without_image=outdated_without_image,
        )

    def session(self) -> Session:
        return self.sessions()

    # -- re-embedding and other processes' writes ---------------------------------------------------

    def write_reembedded(self, items: Sequence[store.Reembedded], *, update_index: bool = True) -> int:
        """Commit new embeddings and attributes of outdated entries (``app.gallery.reembed``); the ones
        now made by the loaded bundle join the index. Returns how many entries were written."""
        with self._write_lock:
            with self.sessions.begin() as session:
                applied = store.write_reembedded(
                    session,
                    items=items,
                    model_version=self.model_version,
                    attribute_model_version=self.models.attributes.version,
                )
                vectors = [item for item in applied if item.embedding is not None]
                ids = [item.seen.id for item in vectors]
                logged = self._logged(session, ids, "reembedded")
                fields = store.filter_fields(session, ids=ids) if update_index else {}
            if update_index and vectors:
                self._index_write(
                    logged,
                    lambda: self.index.add(
                        np.array(ids),
                        [item.seen.collection for item in vectors],
                        np.stack([item.embedding for item in vectors]),
                        cameras=[fields[i][0] for i in ids],
                        times=[fields[i][1] for i in ids],
                    ),
                )
        return len(applied)

    def sync_index(self) -> int:
        """What the service runs about once a second: apply the change log's new rows (writes by other
        replicas, by ``reid-serve reembed``, or an index update of this process that failed after its
        commit), then start a background rebuild of any collection that needs one (past the exact size,
        or many removed rows) and a snapshot when one is due. Returns how many entries were applied."""
        applied = self.catch_up()
        if applied:
            log.info("index caught up with the change log: %d entries added, replaced or removed", applied)
        if self._pruned_at is None or time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
            self.prune_change_log()
        when, position = self._snapshot_at
        # Due once it is old and out of date: an idle service starts no maintenance thread each second.
        due = (
            self.snapshot_dir is not None
            and time.monotonic() - when >= self.snapshot_seconds
            and position != self.position
        )
        if due or self.index.needs_maintenance():
            self._maintain_in_background()
        return applied
