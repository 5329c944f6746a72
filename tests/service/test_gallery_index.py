"""The index by size (app.gallery.index): exact while small, HNSW past ``exact_max``, filters exact.

At 1M-like proportions but small: 20,000 clustered 64-d vectors (several per identity), an exact limit
of 1,000, so the collection is approximate and a filter admitting 0.1% (20 entries) must still return
exactly its best matches.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from app.gallery import index as index_module
from app.gallery.index import GalleryIndex

DIM = 64


def clustered(n: int, seed: int = 0, per: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors, ``per`` views of each identity around a point of a 16-d latent space, and
    40 queries: new views of existing identities."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((16, DIM)).astype(np.float32)
    people = rng.standard_normal((n // per, 16)).astype(np.float32)
    views = people[np.arange(n) % len(people)] + 0.35 * rng.standard_normal((n, 16)).astype(np.float32)
    x = views @ mixing + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
    q = (people[rng.integers(0, len(people), 40)] + 0.35 * rng.standard_normal((40, 16))) @ mixing
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return x, q


def exact(x: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = x @ query
    return ids[np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture(scope="module")
def large() -> tuple[GalleryIndex, np.ndarray, np.ndarray, np.ndarray]:
    x, q = clustered(20_000)
    ids = np.arange(1, len(x) + 1, dtype=np.int64)
    index = GalleryIndex(DIM, exact_max=1000)
    index.add(ids, ["street"] * len(ids), x)
    assert index.kinds() == {"street": "exact"}  # flat until maintained
    assert index.maintain() == ["street"]
    assert index.kinds() == {"street": "hnsw"} and len(index) == 20_000
    return index, x, ids, q


def test_past_the_exact_limit_search_is_approximate_with_recall_of_at_least_0_99(large):
    index, x, ids, q = large
    recall = []
    for query in q:
        _, found = index.search("street", query, 10)
        recall.append(len(set(found.tolist()) & set(exact(x, ids, query, 10).tolist())) / 10)
    assert np.mean(recall) >= 0.99


def test_a_filter_admitting_0_1_percent_returns_its_true_best_matches(large):
    index, x, ids, q = large
    rng = np.random.default_rng(7)
    admitted = np.sort(rng.choice(ids, size=len(ids) // 1000, replace=False))  # 20 of 20,000
    for query in q[:10]:
        scores, found = index.search("street", query, 10, allowed=admitted)
        rows = admitted - 1
        assert found.tolist() == exact(x[rows], admitted, query, 10).tolist()
        assert np.allclose(scores, x[found - 1] @ query, atol=1e-5)
        assert set(found.tolist()) <= set(admitted.tolist())


def test_a_broad_filter_searches_the_graph_and_keeps_to_the_filter(large):
    index, x, ids, q = large
    admitted = ids[ids % 4 == 0]  # 5,000: past the exact limit, so the graph with a selector
    recall = []
    for query in q:
        _, found = index.search("street", query, 10, allowed=admitted)
        assert len(found) == 10 and np.all(found % 4 == 0)
        truth = exact(x[admitted - 1], admitted, query, 10)
        recall.append(len(set(found.tolist()) & set(truth.tolist())) / 10)
    assert np.mean(recall) >= 0.97


def test_removed_and_replaced_entries_leave_the_graph_and_compaction_keeps_the_rest():
    x, q = clustered(4000, seed=1)
    ids = np.arange(1, len(x) + 1, dtype=np.int64)
    index = GalleryIndex(DIM, exact_max=500)
    index.add(ids, ["a"] * len(ids), x)
    index.maintain()
    query = q[0]
    _, best = index.search("a", query, 5)
    assert index.remove(best[:2]) == 2
    _, after = index.search("a", query, 5)
    assert not set(best[:2].tolist()) & set(after.tolist())
    # A removed entry's vector is not handed out (query expansion asks for its neighbours' vectors)
    with pytest.raises(KeyError, match="no longer in the index"):
        index.vectors("a", best[:3])
    np.testing.assert_allclose(index.vectors("a", best[2:3]), x[best[2] - 1][None], atol=1e-6)
    # A replaced vector is found by its new value, never twice.
    index.add(best[2:3], ["a"], -query[None])
    _, again = index.search("a", query, 50)
    assert best[2] not in again.tolist() and len(set(again.tolist())) == len(again)
    assert index.search("a", -query, 1)[1].tolist() == [best[2]]
    # Removing a quarter of the rows is past the compaction share: rebuilt with the survivors only.
    gone = ids[ids % 4 == 1]
    index.remove(gone)
    assert index.needs_maintenance()
    assert index.maintain() == ["a"] and not index.needs_maintenance()
    kept = np.setdiff1d(ids, np.concatenate([gone, best[:2]]))
    assert np.array_equal(np.sort(index.ids("a")), kept)
    assert index.fingerprints() == {"a": (len(kept), int(kept.sum()))}
    assert index.search("a", -query, 1)[1].tolist() == [best[2]]


def test_writes_while_a_collection_is_rebuilt_are_kept(monkeypatch):
    """The graph is built outside the lock: entries added and removed meanwhile end up as written."""
    x, _ = clustered(3000, seed=2)
    ids = np.arange(1, 2001, dtype=np.int64)
    index = GalleryIndex(DIM, exact_max=1000)
    index.add(ids, ["a"] * 2000, x[:2000])
    real = index_module._new_index

    def racing(dim: int, approximate: bool):
        built = real(dim, approximate)
        if not approximate:  # (collection "b" made below)
            return built
        index.remove(ids[:10])  # removed after the copy
        index.add(np.arange(2001, 3001), ["a"] * 1000, x[2000:])  # added after the copy
        index.add(ids[10:11], ["b"], x[10:11])  # moved to another collection
        return built

    monkeypatch.setattr(index_module, "_new_index", racing)
    assert index.maintain() == ["a"]
    expected = np.arange(12, 3001)
    assert index.kinds()["a"] == "hnsw"
    assert np.array_equal(np.sort(index.ids("a")), expected)
    assert index.sizes() == {"a": 2989, "b": 1}
    for row in (11, 1500, 2500):  # ids 12, 1501, 2501 are found by their own vectors
        assert index.search("a", x[row], 1)[1].tolist() == [row + 1]
    assert index.search("a", x[0], 3000)[1].min() >= 12


def test_a_snapshot_loads_back_the_same_index(tmp_path, large):
    index, _, ids, q = large
    index.save(tmp_path, {"position": 42})
    loaded, manifest = GalleryIndex.load(tmp_path, DIM, exact_max=1000)
    assert manifest["position"] == 42
    saved = {name: tuple(value) for name, value in manifest["fingerprints"].items()}
    assert loaded.fingerprints() == index.fingerprints() == saved
    assert loaded.kinds() == {"street": "hnsw"}
    for query in q[:5]:
        assert loaded.search("street", query, 10)[1].tolist() == index.search("street", query, 10)[1].tolist()
    # A second save names its own files; the first's stay for a replica that may be loading them, until
    # they are ten minutes old.
    loaded.remove(ids[:5])
    loaded.save(tmp_path, {"position": 43})
    assert len(list(tmp_path.glob("*.faiss"))) == 2
    again, manifest = GalleryIndex.load(tmp_path, DIM)
    assert manifest["position"] == 43 and len(again) == len(ids) - 5
    old = time.time() - 601
    for path in tmp_path.iterdir():
        os.utime(path, (old, old))
    again.save(tmp_path, {"position": 44})
    assert len(list(tmp_path.glob("*.faiss"))) == 1
    assert GalleryIndex.load(tmp_path, DIM)[1]["position"] == 44
    with pytest.raises(ValueError, match="64-d"):
        GalleryIndex.load(tmp_path, 32)


def test_camera_and_time_filters_held_by_the_index_search_as_the_same_ids_would():
    from datetime import datetime, timedelta

    from app.gallery.store import SearchFilters

    x, q = clustered(4000, seed=3)
    ids = np.arange(1, 4001, dtype=np.int64)
    cameras = [None if i % 5 == 0 else f"cam{i % 4}" for i in range(4000)]
    start = datetime(2026, 1, 1)
    times = [None if i % 7 == 0 else start + timedelta(minutes=i) for i in range(4000)]
    index = GalleryIndex(DIM, exact_max=500)
    index.add(ids, ["a"] * 4000, x, cameras=cameras, times=times)
    index.maintain()
    assert index.kinds() == {"a": "hnsw"}
    for filters in (
        SearchFilters(cameras=("cam1",)),  # 20%: the graph with a selector
        SearchFilters(exclude_cameras=("cam1", "cam2")),
        SearchFilters(cameras=("cam3",), captured_after=start + timedelta(minutes=3000)),  # 4%: scanned
        SearchFilters(captured_before=start + timedelta(minutes=40)),  # 1%: gathered
    ):
        admitted = index.select("a", filters)
        assert index.count("a", filters) == len(admitted) > 0
        for query in q[:5]:
            by_where = index.search("a", query, 10, where=filters)
            by_ids = index.search("a", query, 10, allowed=admitted)
            assert by_where[1].tolist() == by_ids[1].tolist()
            assert set(by_where[1].tolist()) <= set(admitted.tolist())
