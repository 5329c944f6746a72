"""Every kind of bad input gets a 4xx JSON error that names the problem; none is a 500. On SQLite and
PostgreSQL, which refuses some text SQLite stores (NUL characters)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.service.helpers import DATABASES, crop, database_for, files, make_settings

LIMITS = {
    "max_upload_bytes": 20_000,
    "max_images_per_request": 4,
    "max_pixels": 1000 * 1000,
    "max_request_bytes": 200_000,
}


@pytest.fixture(scope="module", params=DATABASES)
def client(request, bundles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    settings = make_settings(bundles, tmp / "data", database_url=database_for(request.param, tmp), **LIMITS)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def good(people) -> bytes:
    return crop(people[0])


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG that claims (and holds, compressed) a huge single-colour image."""
    image = Image.new("L", (width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def check(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    detail = body["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word in detail, detail


def post_all(client, blob_files, data=None):
    """The same upload to the three image endpoints (query takes its single image as 'image')."""
    single = [("image", blob_files[0][1])]
    return [
        client.post("/attributes", files=blob_files, data=data or {}),
        client.post("/gallery", files=blob_files, data=data or {}),
        client.post("/reid/query", files=single, data=data or {}),
    ]


@pytest.mark.parametrize(
    ("blob", "status", "words"),
    [
        (b"this is plain text, not a picture", 415, ["not a readable image"]),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 415, ["not a readable image"]),
        (b"", 422, ["empty file"]),
    ],
    ids=["text", "fake-png-header", "empty"],
)
def test_non_images_are_refused(client, blob, status, words):
    for response in post_all(client, [("images", ("photo.jpg", blob, "image/jpeg"))]):
        check(response, status, *words)


def test_truncated_image_is_refused(client, people):
    jpeg = crop(people[1], fmt="JPEG")
    for response in post_all(client, [("images", ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))]):
        check(response, 415, "cut.jpg")


def test_size_limits(client, good):
    big = noise_png(120)  # about 40 kB > max_upload_bytes
    assert len(big) > LIMITS["max_upload_bytes"]
    for response in post_all(client, files(big)):
        check(response, 413, "limit of 20000 bytes")
    bomb = png_header_bomb(4000, 4000)  # 16 Mpx in a few kB
    assert len(bomb) < LIMITS["max_upload_bytes"]
    for response in post_all(client, files(bomb)):
        check(response, 413, "4000x4000", "pixels")
    check(client.post("/attributes", files=files(*[good] * 5)), 413, "5 images", "limit is 4")
    check(client.post("/gallery", files=files(*[good] * 5)), 413, "limit is 4")
    # The second of two images is the bad one: the message says which.
    check(client.post("/attributes", files=files(good, b"nope")), 415, "images[1]")


def test_whole_request_body_limit(client, good):
    payload = [*files(*[good] * 4), ("metadata", (None, "x" * 250_000))]
    check(client.post("/gallery", files=payload), 413, "request body")

    def chunks():  # no Content-Length: the limit trips while the body streams in
        for _ in range(50):
            yield b"x" * 10_000

    response = client.post(
        "/attributes", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    check(response, 413, "request body")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"metadata": "{not json"}, ["metadata is not valid JSON"]),
        ({"metadata": "[1, 2]"}, ["metadata must be a JSON object"]),
        ({"captured_at": "yesterday"}, ["captured_at"]),
        ({"collection": "../../etc"}, ["collection"]),
        ({"identity": "x" * 300}, ["identity"]),
        ({"identity": "a\x00b"}, ["identity"]),
        ({"camera_id": "cam\x00"}, ["camera_id"]),
        ({"track_id": "a\x00b"}, ["track_id"]),
    ],
    ids=[
        "metadata-syntax",
        "metadata-type",
        "time",
        "collection-path",
        "identity-length",
        "nul",
        "nul-camera",
        "nul-track",
    ],
)
def test_bad_enroll_fields(client, good, data, words):
    check(client.post("/gallery", files=files(good), data=data), 422, *words)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"top_k": "0"}, ["top_k"]),
        ({"top_k": "1001"}, ["top_k", "1000"]),
        ({"top_k": "many"}, ["top_k"]),
        ({"group_by": "camera"}, ["group_by"]),
        ({"min_score": "2"}, ["min_score"]),
        ({"captured_after": "noon"}, ["captured_after"]),
        ({"attribute": "upper_colour"}, ["group=class"]),
        ({"attribute": "shoe_size=42"}, ["unknown attribute group", "upper_colour"]),
        ({"attribute": "upper_colour=chartreuse"}, ["unknown class", "red"]),
        ({"camera_id": ["ok", "bad\x00"]}, ["camera_id"]),
        ({"collection": "x\x00"}, ["collection"]),
    ],
    ids=[
        "top-k-0",
        "top-k-big",
        "top-k-text",
        "group-by",
        "min-score",
        "time",
        "attr-form",
        "attr-group",
        "attr-class",
        "nul-camera",
        "nul-collection",
    ],
)
def test_bad_query_fields(client, good, data, words):
    check(client.post("/reid/query", files=files(good, field="image"), data=data), 422, *words)


def test_missing_or_misplaced_files(client, good):
    check(client.post("/attributes", data={"x": "1"}), 422, "images")
    check(client.post("/gallery", data={"identity": "a"}), 422, "images")
    check(client.post("/reid/query", files=files(good)), 422, "image")  # sent as 'images'
    too_many = files(*[good] * 5, field="image")  # a track longer than max_images_per_request
    check(client.post("/reid/query", files=too_many), 413, "limit is 4")
    check(client.post("/attributes", data={"images": "not a file"}), 422, "images")
    check(
        client.post("/attributes", content=b"{}", headers={"content-type": "application/json"}), 422, "images"
    )


def test_unknown_entries_and_bad_paths(client):
    check(client.get("/gallery/987654"), 404, "987654")
    check(client.delete("/gallery/987654"), 404, "987654")
    # Entry ids are integers in the path itself: /gallery/abc (or /gallery/stats with DELETE) is no
    # entry route, so it is an unknown path, not a malformed id.
    check(client.get("/gallery/abc"), 404, "no such path")
    check(client.delete("/gallery/stats"), 405)
    check(client.get(f"/gallery/{10**20}"), 422, "entry_id")
    check(client.delete(f"/gallery/{2**63}"), 422, "entry_id")
    check(client.get("/gallery", params={"offset": 10**20}), 422, "offset")
    check(client.get("/gallery", params={"identity": "a\x00"}), 422, "identity")
    check(client.delete("/gallery", params={"identity": "a\x00"}), 422, "identity")
    check(client.delete("/gallery"), 422, "identity")
    check(client.get("/gallery", params={"limit": 0}), 422, "limit")
    check(client.get("/gallery", params={"limit": 10_000}), 422, "limit")
    check(client.get("/nowhere"), 404)
    check(client.put("/gallery"), 405)


def test_nothing_was_stored_by_rejected_requests(client):
    assert client.get("/gallery/stats").json()["entries"] == 0
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics
