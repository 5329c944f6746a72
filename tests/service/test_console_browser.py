"""The web console in a real browser: `reid-serve` with API keys on, driven through Debian's Chromium by
Playwright (its own browser download is not reachable here, so ``executable_path``). Enroll a crop in
the page, drop the same crop to search, see its own entry ranked first with its thumbnail, delete it,
see it gone. Skips, saying why, where Chromium or Playwright is missing (.ci/run installs both).

Set REID_CONSOLE_SCREENSHOTS=DIR to keep screenshots at desktop (1280x800) and phone (390x844) width.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import crop, files, wait_ready

CHROMIUM = Path("/usr/bin/chromium")
KEY = "browser-test-key"

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the [dev] extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(bundles, tmp_path_factory) -> Iterator[str]:
    """A `reid-serve` process on a fresh SQLite gallery with an API key; yields its base URL."""
    tmp = tmp_path_factory.mktemp("browser")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env |= {
        "REID_ATTRIBUTE_BUNDLE": str(bundles.attributes),
        "REID_REID_BUNDLE": str(bundles.reid),
        "REID_DATA_DIR": str(tmp / "data"),
        "REID_API_KEYS": KEY,
    }
    port = free_port()
    script = Path(sys.executable).with_name("reid-serve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "app.main"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


def drop_file(page, selector: str, data: bytes, name: str) -> None:
    """A real drop event on ``selector`` carrying one file, as a user dragging it from the desktop."""
    transfer = page.evaluate_handle(
        """([bytes, name]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
            return transfer;
        }""",
        [list(data), name],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def first_card(page):
    return page.locator("#search-results .card").first


def test_enroll_search_delete_in_the_browser(service, browser, people, tmp_path):
    shots = os.environ.get("REID_CONSOLE_SCREENSHOTS")
    # Others in the gallery, so ranking first means something.
    with httpx.Client(base_url=service, headers={"X-API-Key": KEY}, timeout=30) as api:
        for person in people[1:9]:
            response = api.post(
                "/gallery", files=files(crop(person)), data={"identity": f"person-{person.pid}"}
            )
            assert response.status_code == 201, response.text
    target = crop(people[0])
    upload = tmp_path / "target.png"
    upload.write_bytes(target)

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{service}/ui")

    # Keys are on: the page asks for one, and then uses it.
    sync_api.expect(page.locator("#key-help")).to_be_visible()
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    sync_api.expect(page.locator("#key-help")).to_be_hidden()
    sync_api.expect(page.locator("#gallery-status")).to_contain_text("8 of 8 entries searchable")
    assert page.locator("#attribute-filters select").count() == 12

    # Enroll the target crop through the page.
    page.click("[data-tab=enroll]")
    page.set_input_files("#enroll-form input[name=images]", str(upload))
    page.fill("#enroll-form input[name=identity]", "walker")
    page.fill("#enroll-form input[name=camera_id]", "cam-7")
    page.click("#enroll-form button[type=submit]")
    sync_api.expect(page.locator("#enroll-summary")).to_contain_text("1 created")
    enrolled = page.locator("#enroll-results .card").first.get_attribute("data-entry-id")
    assert enrolled

    # Search by dropping the same crop: its own entry first, with its thumbnail and what it says.
    page.click("[data-tab=search]")
    drop_file(page, "#drop", target, "target.png")
    sync_api.expect(first_card(page)).to_have_attribute("data-entry-id", enrolled)
    best = first_card(page)
    sync_api.expect(best.locator(".identity")).to_have_text("walker")
    sync_api.expect(best.locator(".where")).to_contain_text("cam-7")
    sync_api.expect(best.locator(".badge")).to_have_text("match")
    sync_api.expect(best.locator(".chips li").first).to_be_visible()
    assert float(best.locator(".score").inner_text()) > 0.99
    thumb = best.locator(".thumb img")
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle(), timeout=10_000
    )
    assert thumb.get_attribute("src").startswith("blob:")
    assert page.locator("#search-results .card").count() == 9
    if shots:
        page.screenshot(path=str(Path(shots) / "console-1280x800.png"))
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(Path(shots) / "console-390x844.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 800})

    # Delete it from its card (the page asks first), and it is gone from the page and the gallery.
    page.once("dialog", lambda dialog: dialog.accept())
    best.locator("button.delete").click()
    sync_api.expect(page.locator(f'#search-results .card[data-entry-id="{enrolled}"]')).to_have_count(0)
    sync_api.expect(page.locator("#toast")).to_contain_text(f"Entry {enrolled} deleted")
    page.click("#search-form button[type=submit]")
    sync_api.expect(page.locator("#search-summary")).to_contain_text("of 8 candidates")
    assert first_card(page).get_attribute("data-entry-id") != enrolled
    assert page.locator(f'.card[data-entry-id="{enrolled}"]').count() == 0
    with httpx.Client(base_url=service, headers={"X-API-Key": KEY}) as api:
        assert api.get(f"/gallery/{enrolled}").status_code == 404

    # Browse pages through the collection.
    page.click("[data-tab=browse]")
    page.fill("#browse-form input[name=limit]", "5")
    page.click("#browse-form button[type=submit]")
    sync_api.expect(page.locator("#browse-summary")).to_have_text("1–5 of 8")
    page.click("#browse-next")
    sync_api.expect(page.locator("#browse-summary")).to_have_text("6–8 of 8")
    sync_api.expect(page.locator("#browse-results .card")).to_have_count(3)

    # The key never went into a URL, and the page reached nothing but the service.
    assert not [url for url in requested if KEY in url]
    assert all(url.startswith((service, "blob:", "data:")) for url in requested), requested
    assert errors == []
    page.close()


def test_chromium_is_the_one_named():
    """The skip above looks for Debian's binary; a broken install should fail here, not skip."""
    assert shutil.which(str(CHROMIUM))
