"""The web console's files as the service serves them: open like the docs, nothing from outside the
service (offline), a strict content security policy, and left out of the OpenAPI document. What the
page does in a browser is test_console_browser.py's."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.console import STATIC
from app.main import create_app
from tests.service.helpers import make_settings, sqlite_url


@pytest.fixture(scope="module")
def keyed(bundles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    settings = make_settings(bundles, tmp / "data", database_url=sqlite_url(tmp), api_keys="console-key")
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_page_and_its_files_need_no_key_and_name_only_local_assets(keyed):
    page = keyed.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"/ui/static/console.js", "/ui/static/console.css"} <= set(assets)
    types = {".js": "javascript", ".css": "text/css"}
    for asset in assets:
        if asset.startswith("data:"):
            continue
        assert asset.startswith("/ui/static/"), asset
        response = keyed.get(asset)
        assert response.status_code == 200, asset
        assert types[asset[asset.rindex(".") :]] in response.headers["content-type"]
    # The API behind it still wants the key.
    assert keyed.get("/gallery/stats").status_code == 401


def test_nothing_is_loaded_from_outside_the_service():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        assert "@import" not in text, path.name


def test_the_key_travels_in_the_header_and_never_in_a_url():
    script = (STATIC / "console.js").read_text()
    assert 'headers["X-API-Key"] = state.key' in script
    assert "sessionStorage" in script and "localStorage" not in script
    assert not re.search(r"[?&](api_)?key=", script, re.I)
    # What the gallery holds is put on the page as text, never parsed as HTML.
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


def test_the_console_is_not_part_of_the_api_document(keyed):
    paths = keyed.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_models_lists_the_attribute_groups_the_filters_offer(keyed):
    groups = keyed.get("/models", headers={"X-API-Key": "console-key"}).json()["attributes"]["groups"]
    assert "upper_colour" in groups and "red" in groups["upper_colour"]
