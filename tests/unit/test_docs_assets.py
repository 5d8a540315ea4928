"""The docs pages name only files the service serves itself (no Ray: the FastAPI app alone)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from segmentation_service.docs_assets import ASSETS_PATH, serve_docs_offline
from segmentation_service.router import app

PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(app) as http:
        yield http


def referenced_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_pages_load_only_files_of_this_host(client: TestClient, page: str) -> None:
    answer = client.get(page)
    assert answer.status_code == 200
    urls = referenced_urls(answer.text)
    assert urls, answer.text
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    for url in urls:
        fetched = client.get(url)
        assert fetched.status_code == 200 and fetched.content, url
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data: blob:" in policy


def test_the_assets_are_the_swagger_ui_5_and_redoc_builds(client: TestClient) -> None:
    swagger = client.get(f"{ASSETS_PATH}/swagger-ui-bundle.js")
    assert swagger.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in swagger.content
    assert b'"5.' in swagger.content  # OpenAPI 3.1 (FastAPI's schema) needs Swagger UI 5
    assert b"Redoc" in client.get(f"{ASSETS_PATH}/redoc.standalone.js").content
    assert (
        client.get(f"{ASSETS_PATH}/swagger-ui.css").headers["content-type"].startswith("text/css")
    )


def test_the_pages_follow_the_applications_route_prefix() -> None:
    # Serve mounts an application at its route_prefix as the ASGI root_path.
    with TestClient(app, root_path="/secured") as prefixed:
        html = prefixed.get("/docs").text
        redoc = prefixed.get("/redoc").text
    assert "'/secured/openapi.json'" in html and f'"/secured{ASSETS_PATH}/' in html
    assert f'"/secured{ASSETS_PATH}/redoc.standalone.js"' in redoc


def test_the_pages_keep_their_paths_so_the_key_check_covers_them(client: TestClient) -> None:
    from segmentation_service.router import DOCS_PATHS

    assert set(PAGES) <= DOCS_PATHS
    paths = {getattr(route, "path", None) for route in app.routes}
    assert set(PAGES) <= paths


def test_an_app_with_fastapis_cdn_pages_is_refused() -> None:
    with pytest.raises(ValueError, match="docs_url=None"):
        serve_docs_offline(FastAPI())
