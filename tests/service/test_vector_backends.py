"""The vector backends (app.gallery.backends): FAISS in the process, Milvus through Milvus Lite.

- Camera and time filters held by the index admit what the database's query does, on both backends,
  also for camera names that need quoting in a Milvus expression.
- On Milvus, a restart reads what Milvus holds, compares it with the database and repairs it: rows
  Milvus lost are added back from their stored embeddings, rows it holds that the database does not
  are removed; a second start finds nothing to repair.
- Without pymilvus the service still imports and runs on FAISS; choosing Milvus says what to install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.gallery import store
from app.gallery.backends import build_index
from app.gallery.milvus_index import MISSING, filter_expression, is_server_uri
from app.main import create_app, preflight
from tests.service.helpers import (
    BACKENDS,
    FILTER_CASES,
    NEEDS_MILVUS,
    backend_settings,
    crop,
    enroll,
    enroll_for_filters,
    make_settings,
    query,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_camera_and_time_filters_admit_what_the_database_does(
    backend, bundles, database_url, tmp_path, people
):
    overrides = backend_settings(backend, tmp_path)
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url, **overrides)
    with TestClient(create_app(settings)) as client:
        enroll_for_filters(client, people)
        gallery = client.app.state.gallery
        version = gallery.model_version
        for f in FILTER_CASES:
            with gallery.sessions() as session:
                wanted = store.matching_ids(session, collection="default", model_version=version, filters=f)
            assert len(wanted), f  # (each filter admits some and leaves some out)
            assert len(wanted) < 12, f
            assert sorted(gallery.index.select("default", f).tolist()) == sorted(wanted.tolist()), f
            assert gallery.index.count("default", f) == len(wanted), f
            scores, found = gallery.index.search(
                "default", gallery.index.vectors("default", wanted[:1])[0], 12, where=f
            )
            assert sorted(found.tolist()) == sorted(wanted.tolist()), f
            assert found[0] == wanted[0] and scores[0] == pytest.approx(1.0, abs=1e-5)
            assert np.all(np.diff(scores) <= 1e-6)  # best first


def milvus_rows(uri: str, name: str) -> list[int]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri)
    try:
        return sorted(int(r["id"]) for r in client.query(name, filter="id >= 0", output_fields=["id"]))
    finally:
        client.close()


@NEEDS_MILVUS
def test_a_restart_on_milvus_repairs_what_milvus_lost_and_what_it_kept_extra(
    bundles, database_url, tmp_path, people
):
    from pymilvus import MilvusClient

    settings = make_settings(
        bundles, tmp_path / "data", database_url=database_url, **backend_settings("milvus", tmp_path)
    )
    with TestClient(create_app(settings)) as client:
        entries = [enroll(client, crop(p), identity=f"p{p.pid}", camera_id="c1")[0] for p in people[:6]]
        gallery = client.app.state.gallery
        assert gallery.started_from == "verified"
        name, ids = gallery.index.name, sorted(e["id"] for e in entries)
        lost, copied = entries[2], gallery.index.vectors("default", [entries[3]["id"]])[0]
    assert milvus_rows(settings.milvus, name) == ids  # what Milvus itself holds
    assert not (settings.data_dir / "index").exists()  # no FAISS snapshots with Milvus

    # While the service is down, Milvus loses a row and gains one the database never had.
    milvus = MilvusClient(settings.milvus)
    milvus.delete(name, ids=[lost["id"]])
    extra = {"id": 10_000, "collection": "default", "camera": "c1", "captured_at": None, "vector": copied}
    milvus.insert(name, [extra])
    milvus.close()
    assert milvus_rows(settings.milvus, name) == sorted((set(ids) - {lost["id"]}) | {10_000})

    with TestClient(create_app(settings)) as client:
        gallery = client.app.state.gallery
        assert gallery.started_from == "repaired"
        assert 10_000 not in gallery.index and len(gallery.index) == 6
        assert client.get("/gallery/stats").json()["index_size"] == 6
        (top,) = query(client, crop(people[2]), top_k=1)
        assert top["entry_id"] == lost["id"]
        _, found = gallery.index.search("default", copied, 10)  # the index itself, not read back from SQL
        assert sorted(found.tolist()) == ids and found[0] == entries[3]["id"]
        assert gallery.index.vectors("default", [lost["id"]]).shape == (1, gallery.models.reid.dim)
    assert milvus_rows(settings.milvus, name) == ids

    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "verified"
        assert [m["entry_id"] for m in query(client, crop(people[2]), top_k=1)] == [lost["id"]]


@NEEDS_MILVUS
def test_a_milvus_refill_never_empties_the_collection_other_replicas_search(
    bundles, database_url, tmp_path, people, monkeypatch
):
    """``Gallery.rebuild`` on Milvus (the last resort of a start that cannot repair) writes every row
    again and then deletes only the ids the database lacks: at no moment of it does a search by
    another replica of the shared collection miss an entry the database holds."""
    settings = make_settings(
        bundles, tmp_path / "data", database_url=database_url, **backend_settings("milvus", tmp_path)
    )
    with TestClient(create_app(settings)) as client:
        entries = [enroll(client, crop(p), identity=f"p{p.pid}")[0] for p in people[:5]]
        gallery = client.app.state.gallery
        ids = sorted(e["id"] for e in entries)
        probe = gallery.index.vectors("default", [ids[0]])[0]
        extra = {"id": 10_000, "collection": "default", "camera": None, "captured_at": None, "vector": probe}
        gallery.index.client.insert(gallery.index.name, [extra])  # a row the database never had

        seen: list[set[int]] = []  # what a search of the whole collection finds after each write
        for method in ("upsert", "delete"):
            original = getattr(gallery.index.client, method)

            def spy(*args, _original=original, **kwargs):
                done = _original(*args, **kwargs)
                _, found = gallery.index.search("default", probe, 100)
                seen.append(set(found.tolist()))
                return done

            monkeypatch.setattr(gallery.index.client, method, spy)
        assert gallery.rebuild() == 5
        assert seen and all(set(ids) <= found for found in seen)
        assert seen[-1] == set(ids)
        assert 10_000 not in gallery.index
        name = gallery.index.name
    assert milvus_rows(settings.milvus, name) == ids


@NEEDS_MILVUS
def test_each_reid_bundle_has_its_own_milvus_collection(bundles, other_reid_bundle, tmp_path, people):
    """Entries of another bundle are never searched: its vectors live in another Milvus collection."""
    milvus = backend_settings("milvus", tmp_path)
    old = make_settings(bundles, tmp_path / "data", **milvus)
    with TestClient(create_app(old)) as client:
        enroll(client, crop(people[0]), identity="old")
        old_name = client.app.state.gallery.index.name
    new = make_settings(bundles, tmp_path / "data", reid_bundle=other_reid_bundle, **milvus)
    with TestClient(create_app(new)) as client:
        gallery = client.app.state.gallery
        assert gallery.index.name != old_name and len(gallery.index) == 0
        assert query(client, crop(people[0])) == []
        (entry,) = enroll(client, crop(people[1]), identity="new")
        assert [m["entry_id"] for m in query(client, crop(people[1]))] == [entry["id"]]
    assert len(milvus_rows(str(tmp_path / "milvus.db"), old_name)) == 1


def test_filter_expressions_quote_what_they_are_given():
    f = store.SearchFilters(cameras=('a"b',), exclude_cameras=("c\\d",))
    expression = filter_expression('x" or "1', f, allowed=np.array([3, 1]))
    assert expression == (
        'collection == "x\\" or \\"1" and camera in ["a\\"b"] and '
        '(camera is null or camera not in ["c\\\\d"]) and id in [3, 1]'
    )
    assert is_server_uri("http://milvus:19530") and is_server_uri("https://h:443")
    assert not is_server_uri("/var/lib/reid/milvus.db") and not is_server_uri("data/milvus.db")


def test_without_pymilvus_the_service_imports_and_milvus_says_what_to_install(bundles, tmp_path, monkeypatch):
    script = (
        "import sys; sys.modules['pymilvus'] = None; sys.modules['milvus_lite'] = None\n"
        "import app.main, app.gallery.gallery, app.gallery.backends\n"
        "from app.gallery.backends import build_index\n"
        "assert type(build_index('faiss', 8)).__name__ == 'GalleryIndex'\n"
        "try:\n"
        "    build_index('milvus', 8, uri='x.db', name='n')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == MISSING and "pip install 'reid-stack[milvus]'" in MISSING
    with pytest.raises(KeyError, match="known: faiss, milvus"):
        build_index("qdrant", 8)

    import app.main

    real = app.main.importlib.util.find_spec
    monkeypatch.setattr(app.main.importlib.util, "find_spec", lambda n: None if n == "pymilvus" else real(n))
    settings = make_settings(bundles, tmp_path / "data", vector_backend="milvus")
    assert preflight(settings) == MISSING
    assert preflight(make_settings(bundles, tmp_path / "data", vector_backend="faiss")) is None  # none of it
