"""/docs and /redoc work offline: every script, stylesheet and icon they name is served by the service."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import make_settings, sqlite_url

# What each asset must be served as (StaticFiles takes the type from the suffix; .js is text/javascript
# or application/javascript depending on the platform's MIME table).
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


class _Links(HTMLParser):
    """The URLs a browser would fetch for the page: src and href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.fixture(scope="module")
def client(bundles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    # With API keys set: a browser sends no X-API-Key for a <script> tag, so the pages and their assets
    # must stay open. The lifespan is not entered: the docs need no models.
    settings = make_settings(bundles, tmp / "data", database_url=sqlite_url(tmp), api_keys="k1")
    return TestClient(create_app(settings))


@pytest.mark.parametrize(
    ("page", "spec_reference"), [("/docs", "url: '/openapi.json'"), ("/redoc", "spec-url")]
)
def test_docs_pages_load_only_local_assets(client, page, spec_reference):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "http://" not in html and "https://" not in html, "the page names an outside URL"
    assert spec_reference in html
    links = _Links()
    links.feed(html)
    assert any(url.endswith(".js") for url in links.urls), links.urls
    for url in links.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert asset.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], (url, asset.headers)
        assert len(asset.content) > 1000, url  # the real file, not an error page
    assert client.get("/openapi.json").json()["info"]["title"] == "Person re-identification service"


def test_swagger_ui_script_is_the_bundle(client):
    script = client.get("/static-offline-docs/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in script
