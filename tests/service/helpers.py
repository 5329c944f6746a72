"""Helpers for the service tests: small real bundles, encoded synthetic crops, HTTP shortcuts.

The bundles are randomly initialised OSNet-x0.25 networks at 64x32 input whose BatchNorm statistics
are calibrated on synthetic crops (a few forward passes in train mode, no gradient steps), which
spreads their embeddings enough that an image's nearest neighbour is itself. They carry an ONNX graph
unless made with ``onnx=False`` (the torch fallback).
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine
from torch import nn

from app.attribute_schema import schema_as_dict
from app.bundle import EmbeddingSpec, Manifest
from app.gallery import store
from app.gallery.store import drop_schema
from app.nets.attributes import AttributeNet, AttributeNetConfig
from app.nets.bundles import save_bundle
from app.nets.reid import ReIDNet, ReIDNetConfig
from app.preprocess import images_to_batch
from app.settings import Settings
from tests.synthetic import SyntheticIdentity, make_identities, render
from training.onnx_export import add_onnx

SIZE = (64, 32)
BACKBONE = "osnet_x0_25"
POSTGRES_URL = os.environ.get("REID_TEST_POSTGRES_URL")
# Read at import, like the URL: tests that clear the REID_* variables must not turn CI's failure into a skip.
REQUIRE_POSTGRES = os.environ.get("REID_REQUIRE_POSTGRES") == "1"
MATCH_THRESHOLD = 0.9


@dataclass(frozen=True)
class Bundles:
    attributes: Path
    reid: Path


def _calibrate(net: nn.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    crops = [render(p, cam, rng, SIZE) for p in make_identities(32, seed=seed + 100) for cam in (1, 2)]
    batch = torch.from_numpy(images_to_batch(crops, SIZE))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(batch)
    net.eval()


def make_attribute_bundle(directory: Path, *, seed: int = 0, onnx: bool = True) -> Path:
    torch.manual_seed(seed)
    config = AttributeNetConfig(backbone=BACKBONE, input_size=SIZE)
    net = AttributeNet(config)
    _calibrate(net, seed)
    manifest = Manifest(
        name="test-attributes",
        task="attributes",
        architecture=config.to_dict(),
        backbone=BACKBONE,
        input_size=SIZE,
        mean=config.mean,
        std=config.std,
        attribute_schema=schema_as_dict(),
    )
    save_bundle(directory, net, manifest)
    if onnx:
        add_onnx(directory, net=net)
    return directory


def make_reid_bundle(directory: Path, *, seed: int = 0, onnx: bool = True) -> Path:
    torch.manual_seed(seed)
    config = ReIDNetConfig(backbone=BACKBONE, input_size=SIZE)
    net = ReIDNet(config)
    _calibrate(net, seed)
    manifest = Manifest(
        name=f"test-reid-{seed}",
        task="reid",
        architecture=config.to_dict(),
        backbone=BACKBONE,
        input_size=SIZE,
        mean=config.mean,
        std=config.std,
        embedding=EmbeddingSpec(dim=net.embedding_dim),
        match_threshold=MATCH_THRESHOLD,
        metrics={"rank1": 0.0, "note": "random weights, for tests"},
    )
    save_bundle(directory, net, manifest)
    if onnx:
        add_onnx(directory, net=net)
    return directory


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'gallery.sqlite3'}"


def postgres_url() -> str:
    """The test server's URL. Without one the test is skipped, unless REID_REQUIRE_POSTGRES=1 (what
    .ci/run sets): then it fails, so a CI run that lost its server cannot pass on SQLite alone."""
    if POSTGRES_URL:
        return POSTGRES_URL
    reason = "REID_TEST_POSTGRES_URL is not set; `source .ci/postgres.sh` starts a server and sets it"
    if REQUIRE_POSTGRES:
        pytest.fail(f"{reason} (REID_REQUIRE_POSTGRES=1: the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(reason)


def fresh_postgres() -> str:
    url = postgres_url()
    engine = create_engine(url)
    drop_schema(engine)
    engine.dispose()
    return url


def make_settings(bundles: Bundles, data_dir: Path, **overrides) -> Settings:
    values = {
        "attribute_bundle": bundles.attributes,
        "reid_bundle": bundles.reid,
        "data_dir": data_dir,
        "api_keys": [],
        "database_url": None,
    } | overrides
    return Settings(**values)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def crop(person: SyntheticIdentity, cam: int = 1, seed: int = 0, fmt: str = "PNG") -> bytes:
    """One encoded crop; the same arguments give the same bytes."""
    return encode(render(person, cam, np.random.default_rng([person.pid, cam, seed]), SIZE), fmt)


def files(*blobs: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"crop{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def enroll(client, *blobs: bytes, expect: int | None = None, **data) -> list[dict]:
    """POST /gallery; returns the entries (and checks the status code when ``expect`` is given)."""
    response = client.post("/gallery", files=files(*blobs), data=data)
    assert response.status_code == (expect or response.status_code), response.text
    assert response.status_code in (200, 201), response.text
    return response.json()["entries"]


def query(client, blob: bytes, **data) -> list[dict]:
    """POST /reid/query; returns the matches."""
    response = client.post("/reid/query", files=files(blob, field="image"), data=data)
    assert response.status_code == 200, response.text
    return response.json()["matches"]


DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


MILVUS_MISSING = any(importlib.util.find_spec(name) is None for name in ("pymilvus", "milvus_lite"))
NEEDS_MILVUS = pytest.mark.skipif(MILVUS_MISSING, reason="pymilvus or milvus-lite not installed")
# The vector backends of the gallery tests parametrised over them: Milvus through Milvus Lite, a file.
BACKENDS = ["faiss", pytest.param("milvus", marks=NEEDS_MILVUS)]


def backend_settings(backend: str, directory: Path) -> dict[str, str]:
    """Settings overrides for ``backend``: Milvus Lite in a file of ``directory``."""
    if backend == "faiss":
        return {"vector_backend": "faiss"}
    return {"vector_backend": backend, "milvus_uri": str(directory / "milvus.db")}


def database_for(kind: str, directory: Path) -> str:
    """A fresh database: a new SQLite file in ``directory``, or the emptied PostgreSQL test database."""
    return sqlite_url(directory) if kind == "sqlite" else fresh_postgres()


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def wait_ready(process: subprocess.Popen[str], base: str, timeout: float = 90.0) -> None:
    """Poll ``base``/readyz until it answers 200; fail with the server's output if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "reid-serve did not become ready"
        time.sleep(0.3)


# Camera and time filters (quotes and a backslash in a camera name, NULLs, a naive time, time zones) that
# an index must answer exactly as store.matching_ids does; entries are enrolled with camera i % 3 and
# time i % 4 of these lists.
FILTER_CAMERAS = [None, "gate", 'hall "B"\\2']
FILTER_TIMES = [None, "2026-03-01T08:00:00Z", "2026-03-01T10:00:00.250000+02:00", "2026-03-02T00:00:00Z"]
FILTER_CASES = [
    store.SearchFilters(cameras=("gate",)),
    store.SearchFilters(cameras=('hall "B"\\2', "nowhere")),
    store.SearchFilters(exclude_cameras=("gate",)),
    store.SearchFilters(captured_after=datetime(2026, 3, 1, 8, tzinfo=UTC)),
    store.SearchFilters(captured_before=datetime(2026, 3, 1, 8, 0, 0, 250000)),  # naive: UTC
    store.SearchFilters(
        cameras=('hall "B"\\2',),
        captured_after=datetime(2026, 3, 1, 8, 0, 0, 250000),
        captured_before=datetime(2026, 3, 2, tzinfo=UTC),
    ),
]


def enroll_for_filters(client, people) -> None:
    """Enroll 12 people with camera i % 3 and time i % 4 of FILTER_CAMERAS and FILTER_TIMES."""
    for i, person in enumerate(people[:12]):
        fields = {"camera_id": FILTER_CAMERAS[i % 3]} if FILTER_CAMERAS[i % 3] else {}
        if FILTER_TIMES[i % 4]:
            fields["captured_at"] = FILTER_TIMES[i % 4]
        enroll(client, crop(person), **fields)
