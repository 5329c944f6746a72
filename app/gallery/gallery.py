"""The gallery: enrollment, search and deletion over the database (truth) and the FAISS index (derived).

Guarantees, within the one process that serves a database:

- A write is committed to the database before the index sees it; a crash in between loses nothing,
  because the index is rebuilt from the database at every start.
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

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.gallery import store
from app.gallery.index import GalleryIndex
from app.gallery.store import EntryRecord, NewEntry, SearchFilters
from app.inference import Models
from app.metrics import ServiceMetrics
from app.retrieval import expand_queries

log = logging.getLogger(__name__)

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


class Gallery:
    def __init__(
        self,
        engine: Engine,
        models: Models,
        *,
        metrics: ServiceMetrics | None = None,
        search_threads: int = 1,
        query_expansion: int | None = None,
        store_images: bool = True,
    ) -> None:
        self.engine = engine
        self.store_images = store_images
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.models = models
        self.metrics = metrics
        self.search_threads = search_threads
        self.index = GalleryIndex(models.reid.dim, threads=search_threads)
        self._write_lock = threading.Lock()
        spec = models.reid.manifest.query_expansion
        # Neighbours of query expansion (0: off), and the threshold that fits the scores it gives.
        self.expansion = query_expansion if query_expansion is not None else (spec.neighbours if spec else 0)
        self.expanded_threshold = spec.match_threshold if spec else models.reid.match_threshold
        if self.expansion and spec is None:
            log.warning(
                "query expansion is on but %s has no calibrated threshold for it: is_match uses the plain "
                "one (record one with `reid-train evaluate-reid BUNDLE --record`)",
                models.reid.name,
            )

    @classmethod
    def open(
        cls,
        url: str,
        models: Models,
        *,
        metrics: ServiceMetrics | None = None,
        search_threads: int = 1,
        query_expansion: int | None = None,
        store_images: bool = True,
    ) -> Gallery:
        """Connect, create or migrate the schema, and build the index from the database."""
        engine = store.open_engine(url)
        store.prepare_schema(engine)
        gallery = cls(
            engine,
            models,
            metrics=metrics,
            search_threads=search_threads,
            query_expansion=query_expansion,
            store_images=store_images,
        )
        gallery.rebuild()
        return gallery

    def close(self) -> None:
        self.engine.dispose()

    @property
    def model_version(self) -> str:
        return self.models.reid.version

    def rebuild(self) -> int:
        """Replace the index with one built from every searchable row; returns its size."""
        start = time.perf_counter()
        index = GalleryIndex(self.models.reid.dim, threads=self.search_threads)
        with self._write_lock, self.sessions() as session:
            for ids, collections, vectors in store.iter_embeddings(
                session, model_version=self.model_version, dim=index.dim
            ):
                index.add(ids, collections, vectors)
            self.index = index
        log.info("gallery index built: %d entries in %.2fs", len(index), time.perf_counter() - start)
        return len(index)

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
                changed = [(entry_id, computed[d].embedding) for d, entry_id in zip(new, ids, strict=True)]
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
                for digest, entry in known.items():
                    status: EnrollStatus = "existing"
                    if entry.model_version != version:
                        store.refresh_entry(session, entry=entry, item=computed[digest], **kwargs)
                        changed.append((entry.id, computed[digest].embedding))
                        status = "refreshed"
                    record = store.entry_record(entry, model_version=version, has_image=entry.id in stored)
                    results[digest] = _enrolled(record, status)
                repaired: list[int] = []
                if unindexed:
                    found, kept = store.embeddings_of(
                        session, ids=unindexed, model_version=version, dim=self.models.reid.dim
                    )
                    repaired = found.tolist()
                    changed += zip(repaired, kept, strict=True)
            # Committed: only now does the index see the new rows.
            if changed:
                entry_ids, vectors = zip(*changed, strict=True)
                self.index.add(np.array(entry_ids), [collection] * len(entry_ids), np.stack(vectors))
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

        With query expansion on (and ``expand``), the query first takes in its nearest neighbours among
        the entries the filters admit (``app.retrieval``); scores are then similarities to the expanded
        query, judged by the threshold validated for them.

        Matches are plain dicts with the fields of ``app.api.bodies.Match``: the API serialises them in one
        call rather than building a model per match and per attribute (top_k=1000 costs 12k objects).
        """
        start = time.perf_counter()
        with self.sessions() as session:
            allowed = None
            if filters.empty:
                candidates = self.index.sizes().get(collection, 0)
            else:
                allowed = store.matching_ids(
                    session, collection=collection, model_version=self.model_version, filters=filters
                )
                candidates = len(allowed)
            neighbours, threshold = self.query_settings(expand)
            if neighbours:
                sims, near = self.index.search(collection, vector, neighbours, allowed=allowed)
                if len(near):
                    stacked = self.index.vectors(collection, near)
                    vector = expand_queries(vector[None], stacked[None], sims[None])[0]
            k = top_k if group_by == "entry" else 4 * top_k
            while True:
                scores, ids = self.index.search(collection, vector, k, allowed=allowed)
                if min_score is not None:
                    keep = scores >= min_score
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
            {**row, "score": round(score, 6), "is_match": threshold is not None and score >= threshold}
            for score, row in hits[:top_k]
        ]
        if self.metrics is not None:
            self.metrics.search.observe(time.perf_counter() - start)
        return candidates, matches

    # -- deletion -----------------------------------------------------------------------------------

    def delete(self, entry_id: int) -> bool:
        with self._write_lock:
            with self.sessions.begin() as session:
                if store.get_entry(session, entry_id=entry_id) is None:
                    return False
                store.delete_entries(session, ids=[entry_id])
            self.index.remove([entry_id])
        return True

    def erase_identity(self, *, collection: str, identity: str) -> list[int]:
        """Delete every entry of ``identity`` in ``collection``; returns their ids."""
        with self._write_lock:
            with self.sessions.begin() as session:
                ids = store.identity_entry_ids(session, collection=collection, identity=identity)
                store.delete_entries(session, ids=ids)
            self.index.remove(ids)
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
            if update_index and vectors:
                self.index.add(
                    np.array([item.seen.id for item in vectors]),
                    [item.seen.collection for item in vectors],
                    np.stack([item.embedding for item in vectors]),
                )
        return len(applied)

    def sync_index(self) -> int:
        """Bring the index in line with the database after writes by other processes (``reid-serve
        reembed``); returns how many entries were added or removed.

        Per collection, the count and id sum of the rows made by the loaded bundle are compared with the
        index's (one aggregate query); only a collection that differs has its ids read and diffed. Under
        the write lock, so this process's own writes (committed, then indexed) are never half-seen.
        """
        version, dim = self.model_version, self.models.reid.dim
        changes = 0
        with self._write_lock, self.sessions() as session:
            wanted = store.searchable_fingerprints(session, model_version=version)
            held = self.index.fingerprints()
            for collection in sorted(set(wanted) | set(held)):
                if wanted.get(collection, (0, 0)) == held.get(collection, (0, 0)):
                    continue
                rows = store.searchable_ids(session, collection=collection, model_version=version)
                present = self.index.ids(collection)
                gone = np.setdiff1d(present, rows, assume_unique=True)
                new = np.setdiff1d(rows, present, assume_unique=True)
                self.index.remove(gone)
                for start in range(0, len(new), 10_000):  # bound the statement's parameters
                    ids, vectors = store.embeddings_of(
                        session, ids=new[start : start + 10_000].tolist(), model_version=version, dim=dim
                    )
                    self.index.add(ids, [collection] * len(ids), vectors)
                changes += len(gone) + len(new)
        if changes:
            log.info("gallery index caught up with the database: %d entries added or removed", changes)
        return changes
