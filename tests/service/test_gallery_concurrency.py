"""50 concurrent enrollments mixed with queries lose nothing; concurrent duplicates make one entry."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import crop, files, make_settings


@pytest.mark.anyio
async def test_concurrent_enrolls_and_queries(bundles, database_url, tmp_path, people):
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)
    app = create_app(settings)
    blobs = [crop(people[i % len(people)], cam=1 + i // len(people), seed=i) for i in range(50)]
    duplicate = crop(people[0], cam=9)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            seed = await client.post(
                "/gallery", files=files(crop(people[1], cam=8)), data={"identity": "seed"}
            )
            assert seed.status_code == 201

            async def enroll(i: int) -> httpx.Response:
                return await client.post(
                    "/gallery", files=files(blobs[i]), data={"identity": f"id{i}", "camera_id": f"c{i % 3}"}
                )

            async def search(i: int) -> httpx.Response:
                return await client.post(
                    "/reid/query", files=files(blobs[i], field="image"), data={"top_k": 5}
                )

            async def enroll_duplicate() -> httpx.Response:
                return await client.post("/gallery", files=files(duplicate), data={"identity": "dup"})

            jobs = [("enroll", i, enroll(i)) for i in range(50)]
            jobs += [("query", i, search(i)) for i in range(0, 50, 2)]
            jobs += [("duplicate", i, enroll_duplicate()) for i in range(8)]
            random.Random(0).shuffle(jobs)
            responses = await asyncio.gather(*(job for _, _, job in jobs))

            enrolled: dict[int, int] = {}
            duplicates = []
            for (kind, i, _), response in zip(jobs, responses, strict=True):
                assert response.status_code in (200, 201), (kind, response.text)
                if kind == "enroll":
                    assert response.status_code == 201
                    enrolled[i] = response.json()["entries"][0]["id"]
                elif kind == "duplicate":
                    duplicates.append(response.json()["entries"][0])
            assert len(set(enrolled.values())) == 50
            assert len({d["id"] for d in duplicates}) == 1
            assert sum(d["status"] == "created" for d in duplicates) == 1

            stats = (await client.get("/gallery/stats")).json()
            assert stats["entries"] == stats["searchable"] == stats["index_size"] == 52
            listed = (await client.get("/gallery", params={"limit": 500})).json()
            assert {item["id"] for item in listed["items"]} >= set(enrolled.values())
            for i in random.Random(1).sample(sorted(enrolled), 12):  # index and rebuild cover the rest
                entry_id = enrolled[i]
                (best,) = (
                    await client.post("/reid/query", files=files(blobs[i], field="image"), data={"top_k": 1})
                ).json()["matches"]
                assert best["entry_id"] == entry_id and best["identity"] == f"id{i}"

    # A fresh start rebuilds the same index from the database.
    with TestClient(create_app(settings)) as again:
        assert again.get("/gallery/stats").json() == stats
