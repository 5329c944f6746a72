"""The web console at ``/ui``: one HTML page, a script and a style sheet, served by the service itself.

No build step and nothing from a CDN, so it works offline. The page and its files hold no data and are
open like ``/docs``; everything it shows comes from the API, called by the script with the key the user
types into the page (sent as ``X-API-Key``, kept in the tab's session storage, never in a URL).
Left out of the OpenAPI document: it is not part of the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"

# The page runs only its own script and style sheet; thumbnails arrive as blob: URLs (fetched with the
# key); it may not be framed (clickjacking of the delete buttons).
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def console() -> FileResponse:
    """The console's page."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


def mount(app: FastAPI) -> None:
    """Add the page and its files (``/ui/static/...``) to ``app``."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console")
