"""The search index in Milvus: the vectors and the fields filters test, outside the service's process.

The interface is ``app.gallery.index.GalleryIndex``'s, so ``Gallery`` runs on either. One Milvus
collection per database and re-ID bundle version (``name``) holds every gallery collection's entries:
primary key the entry id, then ``collection``, ``camera`` (null for none), ``captured_at`` (integer
microseconds, null for none) and the vector (inner product over L2-normalised embeddings: cosine).
Camera and time filters become Milvus filter expressions; attribute filters stay the database's and
arrive as ``allowed`` ids (an ``id in [...]`` expression).

Milvus persists what it holds, so there are no snapshots: at start ``Gallery`` reads the ids Milvus
holds (``reload``), compares them with the database's searchable rows and repairs the difference.
The process keeps a mirror of which ids Milvus holds per collection (counts, membership and the
fingerprints ``Gallery.verify`` compares with the database cost no round trip); every write goes to
Milvus first and to the mirror once Milvus has accepted it.

``uri`` is a file path (Milvus Lite, embedded: one process per file) or a server URL
(``http://host:19530``, Milvus standalone or a cluster). Needs ``pymilvus`` (``pip install
'reid-stack[milvus]'``; Milvus Lite comes with it on Linux and macOS).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.gallery.index import microseconds

MISSING = (
    "REID_VECTOR_BACKEND=milvus needs pymilvus (and milvus-lite for a file URI): "
    "pip install 'reid-stack[milvus]'"
)
MAX_TOP_K = 16_384  # the largest limit Milvus accepts for one search
WRITE_BATCH = 2_000  # rows per insert (512-d: about 4 MB per message)


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names a Milvus server (``http://``, ``https://``, ``tcp://``) rather than a
    Milvus Lite file."""
    return uri.split("://", 1)[0].lower() in ("http", "https", "tcp", "grpc") and "://" in uri


def _quote(value: str) -> str:
    """A string literal for a Milvus filter expression (double quotes, backslash escapes)."""
    return json.dumps(value)


def _strings(values: Sequence[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def collection_name(version: str, key: str) -> str:
    """The Milvus collection of one database (``key``) and re-ID bundle ``version``: letters, digits and
    underscores, starting with a letter, as Milvus requires."""
    return re.sub(r"[^0-9A-Za-z_]", "_", f"reid_{version}_{key}")[:255]


def filter_expression(collection: str, filters: Any = None, allowed: np.ndarray | None = None) -> str:
    """The Milvus expression admitting ``collection``'s entries that meet ``filters`` (a
    ``store.SearchFilters`` without attribute conditions) and, if given, whose ids are ``allowed``."""
    parts = [f"collection == {_quote(collection)}"]
    if filters is not None:
        assert not filters.attributes, "attribute filters are the database's"
        if filters.cameras:
            parts.append(f"camera in {_strings(filters.cameras)}")
        if filters.exclude_cameras:  # an entry without a camera is in no excluded one
            parts.append(f"(camera is null or camera not in {_strings(filters.exclude_cameras)})")
        if filters.captured_after is not None:
            parts.append(f"captured_at >= {microseconds(filters.captured_after)}")
        if filters.captured_before is not None:
            parts.append(f"captured_at <= {microseconds(filters.captured_before)}")
    if allowed is not None:
        parts.append("id in [" + ", ".join(str(int(i)) for i in allowed) + "]")
    return " and ".join(parts)


class MilvusIndex:
    """Thread-safe: Milvus takes concurrent calls; a lock guards the mirror of held ids."""

    persistent = True  # what it holds survives the process: Gallery verifies and repairs, no snapshots

    def __init__(self, dim: int, *, uri: str, name: str, token: str | None = None, **_: Any) -> None:
        try:
            from pymilvus import DataType, MilvusClient
        except ImportError as exc:
            raise RuntimeError(MISSING) from exc
        self.dim = dim
        self.uri = uri
        self.name = name
        self._lock = threading.Lock()
        self._held: dict[int, str] = {}  # entry id -> gallery collection
        self._members: dict[str, set[int]] = {}
        if not is_server_uri(uri):  # Milvus Lite: its file's folder must exist (the data directory)
            Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(uri=uri, token=token or "")
        except Exception as exc:
            if "milvus_lite" in str(exc) or isinstance(exc, ImportError):
                raise RuntimeError(f"{MISSING}: {exc}") from exc
            raise
        if self.client.has_collection(name):
            fields = self.client.describe_collection(name)["fields"]
            vector = next(f for f in fields if f["name"] == "vector")
            held_dim = int(vector.get("params", {}).get("dim", dim))
            if held_dim != dim:
                raise ValueError(f"Milvus collection {name} holds {held_dim}-d vectors, the bundle {dim}-d")
            # A collection reopened (Milvus Lite after a restart, a server after a release) may be
            # released: searched and queried only once loaded (100k x 512 on Milvus Lite: about a minute).
            self.client.load_collection(name)
        else:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("collection", DataType.VARCHAR, max_length=1024)
            schema.add_field("camera", DataType.VARCHAR, max_length=1024, nullable=True)
            schema.add_field("captured_at", DataType.INT64, nullable=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = self.client.prepare_index_params()
            # Milvus Lite: exact (FLAT; its AUTOINDEX is approximate, 47 of 50 vectors found themselves
            # first at 100k). A server: AUTOINDEX, the index Milvus chooses for the deployment.
            kind = "AUTOINDEX" if is_server_uri(uri) else "FLAT"
            index.add_index(field_name="vector", index_type=kind, metric_type="IP")
            # Strong: a search sees every write acknowledged before it (the FAISS index's guarantee).
            self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
        self.reload()

    # -- bookkeeping --------------------------------------------------------------------------------

    def reload(self) -> int:
        """Read which ids Milvus holds, per collection, into the mirror; returns how many.

        Pages of ``id > last`` (Milvus returns a limited query in primary-key order); when the total
        differs from Milvus's count (a page out of order), once more through ``query_iterator``,
        which is certain but slow on Milvus Lite (100k ids: 99 s against 5 s here)."""
        held: dict[int, str] = {}
        last = -(2**63)
        while rows := self.client.query(
            self.name, filter=f"id > {last}", output_fields=["id", "collection"], limit=MAX_TOP_K
        ):
            held.update((int(row["id"]), row["collection"]) for row in rows)
            last = max(int(row["id"]) for row in rows)
        if len(held) != self.stored_count():
            held = {}
            iterator = self.client.query_iterator(
                self.name, batch_size=10_000, filter="", output_fields=["id", "collection"]
            )
            try:
                while batch := iterator.next():
                    held.update((int(row["id"]), row["collection"]) for row in batch)
            finally:
                iterator.close()
        members: dict[str, set[int]] = {}
        for entry_id, collection in held.items():
            members.setdefault(collection, set()).add(entry_id)
        with self._lock:
            self._held, self._members = held, members
        return len(held)

    def stored_count(self) -> int:
        """How many rows Milvus itself counts (the mirror's size when the two agree)."""
        rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        self.client.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def __contains__(self, entry_id: int) -> bool:
        with self._lock:
            return int(entry_id) in self._held

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {name: len(ids) for name, ids in self._members.items() if ids}

    def kinds(self) -> dict[str, str]:
        return dict.fromkeys(self.sizes(), "milvus")

    def ids(self, collection: str) -> np.ndarray:
        with self._lock:
            return np.fromiter(self._members.get(collection, ()), dtype=np.int64)

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {name: (len(ids), sum(ids)) for name, ids in self._members.items() if ids}

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
        """Add (or replace: an upsert) vectors with their collection, camera and captured_at."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        rows = [
            {
                "id": int(entry_id),
                "collection": collections[i],
                "camera": cameras[i] if cameras is not None else None,
                "captured_at": (
                    microseconds(times[i]) if times is not None and times[i] is not None else None
                ),
                "vector": vectors[i],
            }
            for i, entry_id in enumerate(ids.tolist())
        ]
        for start in range(0, len(rows), WRITE_BATCH):
            self.client.upsert(self.name, rows[start : start + WRITE_BATCH])
        with self._lock:
            for row in rows:
                before = self._held.get(row["id"])
                if before is not None:
                    self._members[before].discard(row["id"])
                self._held[row["id"]] = row["collection"]
                self._members.setdefault(row["collection"], set()).add(row["id"])

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove ids (those the mirror holds, and any Milvus holds that it does not); returns how many
        the mirror held."""
        ids = [int(i) for i in np.unique(np.asarray(ids, dtype=np.int64))]
        if not ids:
            return 0
        for start in range(0, len(ids), WRITE_BATCH):
            self.client.delete(self.name, ids=ids[start : start + WRITE_BATCH])
        removed = 0
        with self._lock:
            for entry_id in ids:
                collection = self._held.pop(entry_id, None)
                if collection is not None:
                    self._members[collection].discard(entry_id)
                    removed += 1
        return removed

    # -- reads --------------------------------------------------------------------------------------

    def vectors(self, collection: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (which must be in ``collection``), in that order; ``KeyError``
        if one was removed."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64)]
        if not ids:
            return np.empty((0, self.dim), np.float32)
        rows = self.client.get(self.name, ids=ids, output_fields=["vector"])
        by_id = {int(row["id"]): row["vector"] for row in rows}
        return np.asarray([by_id[i] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    def select(self, collection: str, filters: Any) -> np.ndarray:
        """Ids of ``collection``'s entries that meet ``filters`` (no attribute conditions)."""
        found: list[int] = []
        iterator = self.client.query_iterator(
            self.name, batch_size=10_000, filter=filter_expression(collection, filters), output_fields=["id"]
        )
        try:
            while batch := iterator.next():
                found.extend(int(row["id"]) for row in batch)
        finally:
            iterator.close()
        return np.asarray(found, dtype=np.int64)

    def count(self, collection: str, filters: Any) -> int:
        """How many entries ``select`` admits."""
        expression = filter_expression(collection, filters)
        rows = self.client.query(self.name, filter=expression, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

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
        only the entries that meet ``where``. ``k`` is capped at Milvus's limit of 16,384."""
        empty = np.empty(0, np.float32), np.empty(0, np.int64)
        if k <= 0 or not self.sizes().get(collection):
            return empty
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                return empty
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim)
        hits = self.client.search(
            self.name,
            data=[query],
            anns_field="vector",
            limit=min(k, MAX_TOP_K),
            filter=filter_expression(collection, where, allowed),
            output_fields=["id"],
            search_params={"metric_type": "IP"},
        )[0]
        scores = np.fromiter((hit["distance"] for hit in hits), dtype=np.float32, count=len(hits))
        ids = np.fromiter((hit["id"] for hit in hits), dtype=np.int64, count=len(hits))
        order = np.argsort(-scores, kind="stable")  # (Milvus returns them best first; make it certain)
        return scores[order], ids[order]

    # -- what the FAISS index does and Milvus does itself ------------------------------------------

    def needs_maintenance(self) -> bool:
        return False

    def maintain(self) -> list[str]:
        return []  # Milvus builds and compacts its own index segments
