"""``/docs`` and ``/redoc`` in a real browser, with nothing allowed to leave the host.

Headless Chromium (Debian's ``chromium``, driven through Playwright's protocol client; no
browser is downloaded) opens the demo app's pages. Every request the pages make to another
host is caught and refused before it reaches the network, so a page that still needed a CDN
would stay blank and the test would name the URL it wanted.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Route, sync_playwright

from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: A fresh profile (--user-data-dir, given by Playwright's persistent context) and no traffic
#: of Chromium's own: no sync, no component updates, no QUIC.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


@dataclass
class Traffic:
    """What a page asked for: requests to the service, and any to another host."""

    origin: str
    local: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    blocked_by_policy: list[str] = field(default_factory=list)

    def route(self, route: Route) -> None:
        url = route.request.url
        if url == self.origin or url.startswith(self.origin + "/"):
            self.local.append(url)
            route.continue_()
        else:
            self.elsewhere.append(url)
            route.abort("blockedbyclient")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            yield context
        finally:
            context.close()


def open_page(context: BrowserContext, url: str, origin: str) -> tuple[Page, Traffic]:
    traffic = Traffic(origin)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.route("**/*", traffic.route)
    # A request the page's Content-Security-Policy refuses never reaches the network (nor the
    # route above); it is listed so the test says which ones there were.
    page.on(
        "requestfailed",
        lambda request: (
            traffic.blocked_by_policy.append(request.url) if request.failure == "csp" else None
        ),
    )
    page.goto(url)
    return page, traffic


def assert_stayed_on_the_host(traffic: Traffic) -> None:
    assert not traffic.elsewhere, f"the page asked another host for {traffic.elsewhere}"
    assert traffic.local, "the page made no request at all"


def test_swagger_ui_renders_every_operation_and_uploads_an_image_offline(
    cluster: Cluster, browser: BrowserContext, tmp_path: Path
) -> None:
    paths = list(httpx.get(f"{cluster.url}/openapi.json", timeout=60).json()["paths"])
    page, traffic = open_page(browser, f"{cluster.url}/docs", cluster.url)
    page.wait_for_selector(".opblock")
    shown = page.locator(".opblock-summary-path").all_inner_texts()
    assert sorted(path.replace("\u200b", "") for path in shown) == sorted(paths)

    # Try it out: the first body type offered (image/jpeg) takes a file.
    frame = tmp_path / "frame.jpg"
    frame.write_bytes(encode(product_frame(96, 64), "JPEG"))
    operation = page.locator("#operations-default-remove_background_v1_remove_background_post")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.locator("input[type=file]").set_input_files(frame)
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip().startswith("200"), status.inner_text()
    # Swagger UI shows an image answer as a picture it made from the answer's bytes.
    cutout = operation.locator(".live-responses-table img")
    cutout.wait_for()
    assert (cutout.get_attribute("src") or "").startswith("blob:")
    assert page.evaluate("img => img.naturalWidth", cutout.element_handle()) == 96

    assert_stayed_on_the_host(traffic)
    # The upload went to this host's route, with the form's default query (output=rgba, ...).
    uploads = [
        url for url in traffic.local if url.startswith(f"{cluster.url}/v1/remove-background?")
    ]
    assert len(uploads) == 1 and "output=rgba" in uploads[0], traffic.local
    page.close()


def test_redoc_renders_the_operations_offline(cluster: Cluster, browser: BrowserContext) -> None:
    page, traffic = open_page(browser, f"{cluster.url}/redoc", cluster.url)
    page.wait_for_selector("h1")
    assert page.locator("h1").first.inner_text().startswith("product-segmentor")
    text = page.locator("body").inner_text()
    for summary in ("Remove Background", "Segment", "Products", "Frames"):
        assert summary in text, summary
    assert_stayed_on_the_host(traffic)
    # ReDoc's own logo comes from its CDN whatever its options say: the page's policy keeps
    # the browser from asking for it.
    assert all(url.startswith("https://cdn.redoc.ly/") for url in traffic.blocked_by_policy)
    page.close()
