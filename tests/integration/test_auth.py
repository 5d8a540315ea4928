"""The optional API key, on a second application of the same cluster."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def secured(cluster: Cluster) -> Iterator[str]:
    config = cluster.app_config()
    app = config["applications"][0]
    secured_app = {
        **app,
        "name": "secured",
        "route_prefix": "/secured",
        "runtime_env": {"env_vars": {**app["runtime_env"]["env_vars"], "DEMO_API_KEY": KEY}},
        "args": {**app["args"], "router": {**app["args"]["router"], "api_key_env": "DEMO_API_KEY"}},
    }
    config["applications"] = [app, secured_app]
    cluster.deploy(config, "secured.yaml")
    url = f"{cluster.url}/secured"
    try:
        cluster.wait_ready_at(url, headers={"Authorization": f"Bearer {KEY}"})
        yield url
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")


def test_requests_without_the_key_are_refused(secured: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = httpx.get(f"{secured}/v1/models", headers=headers, timeout=60)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_requests_with_the_key_are_served(secured: str) -> None:
    response = httpx.post(
        f"{secured}/v1/remove-background",
        content=encode(product_frame(64, 48), "PNG"),
        headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_health_needs_no_key(secured: str) -> None:
    assert httpx.get(f"{secured}/healthz", timeout=60).status_code == 200
