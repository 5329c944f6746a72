"""The in-memory search index: exact inner product over L2-normalised embeddings (cosine), with FAISS.

One ``IndexIDMap2(IndexFlatIP)`` per collection, keyed by the entry's database id. It holds only
entries made by the loaded re-ID bundle and is always rebuilt from the database at start. Filters are
applied inside the search with an ID selector, so a narrow filter still returns its best matches.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import faiss
import numpy as np


class GalleryIndex:
    """Thread-safe: one lock guards every read and write of the FAISS structures.

    ``threads`` caps FAISS's OpenMP threads. OpenMP keeps that setting per OS thread, so it is applied
    in whichever worker thread calls in; one query's scan is memory-bound, and a second OpenMP pool
    spinning next to torch's only steals the cores.
    """

    def __init__(self, dim: int, *, threads: int = 1) -> None:
        self.dim = dim
        self.threads = threads
        self._lock = threading.Lock()
        self._indexes: dict[str, faiss.IndexIDMap2] = {}
        self._collection_of: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._collection_of)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._collection_of

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {name: int(index.ntotal) for name, index in self._indexes.items()}

    def add(self, ids: Sequence[int] | np.ndarray, collections: Sequence[str], vectors: np.ndarray) -> None:
        """Add (or replace) vectors; ``collections[i]`` is the collection of ``ids[i]``."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        with self._lock:
            faiss.omp_set_num_threads(self.threads)
            self._remove_locked(ids[np.fromiter((i in self._collection_of for i in ids.tolist()), bool)])
            by_collection: dict[str, list[int]] = {}
            for row, name in enumerate(collections):
                by_collection.setdefault(name, []).append(row)
            for name, rows in by_collection.items():
                index = self._indexes.get(name)
                if index is None:
                    index = self._indexes[name] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
                index.add_with_ids(vectors[rows], ids[rows])
                for entry_id in ids[rows].tolist():
                    self._collection_of[entry_id] = name

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove ids that are present; returns how many were."""
        with self._lock:
            return self._remove_locked(np.asarray(ids, dtype=np.int64))

    def _remove_locked(self, ids: np.ndarray) -> int:
        by_collection: dict[str, list[int]] = {}
        for entry_id in ids.tolist():
            name = self._collection_of.pop(entry_id, None)
            if name is not None:
                by_collection.setdefault(name, []).append(entry_id)
        for name, members in by_collection.items():
            self._indexes[name].remove_ids(faiss.IDSelectorBatch(np.asarray(members, dtype=np.int64)))
        return sum(len(m) for m in by_collection.values())

    def ids(self, collection: str) -> np.ndarray:
        """The ids held for ``collection`` (int64, unordered)."""
        with self._lock:
            index = self._indexes.get(collection)
            if index is None:
                return np.empty(0, np.int64)
            return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        """{collection: (size, sum of ids)}, what ``store.searchable_fingerprints`` gives for the rows."""
        with self._lock:
            sums = {
                name: (int(index.ntotal), int(faiss.vector_to_array(index.id_map).sum()))
                for name, index in self._indexes.items()
            }
        return {name: value for name, value in sums.items() if value[0]}

    def vectors(self, collection: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (which must be in ``collection``), in that order."""
        with self._lock:
            index = self._indexes[collection]
            return np.stack([index.reconstruct(int(i)) for i in ids])

    def search(
        self, collection: str, query: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` (scores, ids) in ``collection``, highest first; only ``allowed`` ids if given."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        with self._lock:
            faiss.omp_set_num_threads(self.threads)
            index = self._indexes.get(collection)
            if index is None or index.ntotal == 0 or k <= 0:
                return np.empty(0, np.float32), np.empty(0, np.int64)
            params = None
            if allowed is not None:
                if len(allowed) == 0:
                    return np.empty(0, np.float32), np.empty(0, np.int64)
                allowed = np.ascontiguousarray(allowed, dtype=np.int64)
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
                k = min(k, len(allowed))
            k = min(k, int(index.ntotal))
            scores, ids = index.search(query, k, params=params)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]
