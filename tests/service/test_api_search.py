"""Search and listing over one populated gallery per database (read-only tests share it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from app.api.bodies import QueryResponse
from app.main import create_app
from tests.service.helpers import (
    BACKENDS,
    DATABASES,
    MATCH_THRESHOLD,
    backend_settings,
    crop,
    database_for,
    enroll,
    files,
    make_settings,
    parse_time,
    query,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=DATABASES)
def gallery(request, backend, bundles, people, tmp_path_factory):
    """12 people x 2 cameras, each at its own minute after T0: (client, entry by (pid, cam)); on each
    database and each vector backend."""
    tmp = tmp_path_factory.mktemp("search")
    url = database_for(request.param, tmp)
    settings = make_settings(bundles, tmp / "data", database_url=url, **backend_settings(backend, tmp))
    with TestClient(create_app(settings)) as client:
        entries = {}
        for n, person in enumerate(people[:12]):
            for cam in (1, 2):
                (entry,) = enroll(
                    client,
                    crop(person, cam),
                    identity=f"person-{person.pid}",
                    camera_id=f"cam-{cam}",
                    captured_at=(T0 + timedelta(minutes=2 * n + cam)).isoformat(),
                    track_id=f"t{person.pid}",
                    metadata=json.dumps({"site": "gate", "n": n}),
                )
                entries[(person.pid, cam)] = entry
        yield client, entries


@pytest.fixture
def client(gallery):
    return gallery[0]


@pytest.fixture
def populated(gallery):
    return gallery[1]


def test_enroll_then_query_returns_the_enrolled_identity_first(client, people, populated):
    for person in people[:12]:
        matches = query(client, crop(person, 1), top_k=5)
        best = matches[0]
        assert best["entry_id"] == populated[(person.pid, 1)]["id"]
        assert best["identity"] == f"person-{person.pid}"
        assert best["score"] == pytest.approx(1.0, abs=1e-4)
        assert best["is_match"] is True
        assert best["camera_id"] == "cam-1"
        assert best["metadata"]["site"] == "gate"
        assert set(best["attributes"]) >= {"gender", "upper_colour", "lower_colour"}
        assert parse_time(best["captured_at"]) == parse_time(populated[(person.pid, 1)]["captured_at"])
        scores = [m["score"] for m in matches]
        assert scores == sorted(scores, reverse=True)
        assert all(m["is_match"] == (m["score"] >= MATCH_THRESHOLD) for m in matches)


def test_enrollment_stores_what_it_returns(client, people, populated):
    entry = populated[(people[0].pid, 2)]
    assert entry["status"] == "created" and entry["searchable"] is True
    stored = client.get(f"/gallery/{entry['id']}").json()
    for key in (
        "identity",
        "camera_id",
        "track_id",
        "metadata",
        "attributes",
        "image_sha256",
        "model_version",
    ):
        assert stored[key] == entry[key]
    assert parse_time(stored["captured_at"]) == T0 + timedelta(minutes=2)
    for value in stored["attributes"].values():
        assert 0.0 <= value["score"] <= 1.0


def test_matches_say_what_the_entries_say_and_keep_the_documented_shape(client, people, populated):
    """Matches are built from plain SQL rows, not from the entry models: same fields, same values, and
    a body that validates against the QueryResponse the OpenAPI document declares."""
    response = client.post(
        "/reid/query", files=files(crop(people[3], 1), field="image"), data={"top_k": len(populated)}
    )
    body = QueryResponse.model_validate(response.json())
    assert len(body.matches) == len(populated) == body.candidates
    for match in response.json()["matches"]:
        stored = client.get(f"/gallery/{match['entry_id']}").json()
        for key in ("identity", "collection", "camera_id", "track_id", "metadata", "attributes"):
            assert match[key] == stored[key], key
        assert parse_time(match["captured_at"]) == parse_time(stored["captured_at"])
        assert match["captured_at"].endswith("Z")


def full_ranking(client, blob: bytes, n: int) -> list[dict]:
    return query(client, blob, top_k=n)


@pytest.mark.parametrize(
    ("form", "keep"),
    [
        ({"camera_id": "cam-2"}, lambda m: m["camera_id"] == "cam-2"),
        ({"exclude_camera_id": "cam-1"}, lambda m: m["camera_id"] != "cam-1"),
        (
            {"captured_after": (T0 + timedelta(minutes=9)).isoformat()},
            lambda m: parse_time(m["captured_at"]) >= T0 + timedelta(minutes=9),
        ),
        (
            {
                "captured_after": (T0 + timedelta(minutes=5)).isoformat(),
                "captured_before": (T0 + timedelta(minutes=8)).isoformat(),
            },
            lambda m: T0 + timedelta(minutes=5) <= parse_time(m["captured_at"]) <= T0 + timedelta(minutes=8),
        ),
    ],
    ids=["camera", "exclude-camera", "after", "between"],
)
def test_filters_return_the_best_matches_that_pass(client, people, populated, form, keep):
    blob = crop(people[0], 1)
    expected = [m["entry_id"] for m in full_ranking(client, blob, len(populated)) if keep(m)]
    assert expected, "the filter should leave something"
    got = query(client, blob, top_k=3, **form)
    assert [m["entry_id"] for m in got] == expected[:3]
    assert all(keep(m) for m in got)


def test_attribute_filters(client, people, populated):
    blob = crop(people[0], 1)
    ranking = full_ranking(client, blob, len(populated))
    # Pick a value held by some but not all entries, so the filter matters.
    counts: dict[tuple[str, str], int] = {}
    for m in ranking:
        for group, value in m["attributes"].items():
            counts[(group, value["value"])] = counts.get((group, value["value"]), 0) + 1
    (group, value), _ = min(((gv, n) for gv, n in counts.items() if n >= 2), key=lambda x: x[1])
    expected = [m["entry_id"] for m in ranking if m["attributes"][group]["value"] == value]
    got = query(client, blob, top_k=len(populated), attribute=f"{group}={value}")
    assert [m["entry_id"] for m in got] == expected

    # Two classes of one group: either; two groups: both.
    other_value = next(v for (g, v) in counts if g == group and v != value)
    either = query(client, blob, top_k=50, attribute=[f"{group}={value}", f"{group}={other_value}"])
    assert {m["attributes"][group]["value"] for m in either} <= {value, other_value}
    assert len(either) == sum(m["attributes"][group]["value"] in (value, other_value) for m in ranking)
    second_group = next(g for (g, _) in counts if g != group)
    second_value = ranking[0]["attributes"][second_group]["value"]
    both = query(client, blob, top_k=50, attribute=[f"{group}={value}", f"{second_group}={second_value}"])
    expected_both = [
        m["entry_id"]
        for m in ranking
        if m["attributes"][group]["value"] == value and m["attributes"][second_group]["value"] == second_value
    ]
    assert [m["entry_id"] for m in both] == expected_both


def test_group_by_identity_and_min_score(client, people, populated):
    blob = crop(people[0], 1)
    ranking = full_ranking(client, blob, len(populated))
    grouped = query(client, blob, top_k=5, group_by="identity")
    identities = [m["identity"] for m in grouped]
    assert len(identities) == len(set(identities)) == 5
    best_per_identity: dict[str, int] = {}
    for m in ranking:
        best_per_identity.setdefault(m["identity"], m["entry_id"])
    assert [m["entry_id"] for m in grouped] == list(best_per_identity.values())[:5]

    cut = ranking[4]["score"]
    above = query(client, blob, top_k=100, min_score=cut)
    assert [m["entry_id"] for m in above] == [m["entry_id"] for m in ranking if m["score"] >= cut]


def test_list_pages_and_filters(client, people, populated):
    seen, offset = [], 0
    while offset is not None:
        page = client.get("/gallery", params={"limit": 5, "offset": offset}).json()
        assert page["total"] == len(populated) and len(page["items"]) <= 5
        seen += [item["id"] for item in page["items"]]
        offset = page["next_offset"]
    assert seen == sorted(e["id"] for e in populated.values())
    cam2 = client.get("/gallery", params={"camera_id": "cam-2", "limit": 500}).json()
    assert cam2["total"] == 12 and {i["camera_id"] for i in cam2["items"]} == {"cam-2"}
    one = client.get("/gallery", params={"identity": f"person-{people[4].pid}"}).json()
    assert {i["id"] for i in one["items"]} == {populated[(people[4].pid, c)]["id"] for c in (1, 2)}
    assert client.get("/gallery", params={"collection": "nope"}).json()["total"] == 0
