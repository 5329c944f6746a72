"""POST /attributes: one answer per crop, and with track=true one more for the crops as one person."""

from __future__ import annotations

import pytest

from tests.service.helpers import crop, files


def test_each_crop_gets_every_group(client, people):
    body = client.post("/attributes", files=files(crop(people[0]), crop(people[1]))).json()
    groups = client.get("/models").json()["attributes"]["groups"]
    assert [c["index"] for c in body["crops"]] == [0, 1] and "track" not in body
    for c in body["crops"]:
        assert set(c["attributes"]) == set(groups)
        for name, answer in c["attributes"].items():
            assert answer["value"] in groups[name] and 0 < answer["score"] <= 1


def test_track_averages_the_crops_probabilities(client, people):
    one = crop(people[0])
    alone = client.post("/attributes", files=files(one)).json()["crops"][0]["attributes"]
    # The same crop three times is a track whose average is that crop.
    same = client.post("/attributes", files=files(one, one, one), data={"track": "true"}).json()
    assert same["track"] == alone and all(c["attributes"] == alone for c in same["crops"])
    pair = client.post(
        "/attributes", files=files(crop(people[1]), crop(people[2], cam=2)), data={"track": "true"}
    ).json()
    first, second = (c["attributes"] for c in pair["crops"])
    for name, answer in pair["track"].items():
        if first[name]["value"] == second[name]["value"]:  # both crops agree: the mean of their scores
            assert answer["value"] == first[name]["value"]
            assert answer["score"] == pytest.approx(
                (first[name]["score"] + second[name]["score"]) / 2, abs=2e-6
            )
        else:  # they disagree: one of the two, with at most the larger of their scores
            assert answer["value"] in (first[name]["value"], second[name]["value"])
            assert answer["score"] <= max(first[name]["score"], second[name]["score"])


def test_track_must_be_a_boolean(client, people):
    response = client.post("/attributes", files=files(crop(people[0])), data={"track": "perhaps"})
    assert response.status_code == 422 and "track" in response.text
