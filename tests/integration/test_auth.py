"""The optional API key, on a second application of the same cluster."""

from __future__ import annotations

import time
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


def test_the_api_description_needs_the_key_too(secured: str) -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        refused = httpx.get(f"{secured}{path}", timeout=60)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "unauthorized"
        served = httpx.get(
            f"{secured}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert served.status_code == 200, path


def test_a_non_ascii_key_is_refused_not_a_500(secured: str) -> None:
    for token in ("\u00e9t\u00e9", "s3cret-key\u00ff", "\u00ff" * 300):
        response = httpx.get(
            f"{secured}/v1/models",
            headers={"Authorization": f"Bearer {token}".encode("latin-1")},
            timeout=60,
        )
        assert response.status_code == 401


def test_grpc_calls_need_the_key(cluster: Cluster, secured: str) -> None:
    import grpc

    from segmentation_client.proto import segmentor_pb2 as pb
    from segmentation_client.proto.segmentor_pb2_grpc import SegmentorStub

    body = encode(product_frame(64, 48), "PNG")
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = SegmentorStub(channel)
        app = [("application", "secured")]
        for metadata in (app, [*app, ("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as info:
                stub.RemoveBackground(pb.ImageRequest(image=body), timeout=60, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.RemoveBackground(
            pb.ImageRequest(image=body, output=pb.RAW_ALPHA),
            timeout=120,
            metadata=[*app, ("authorization", f"Bearer {KEY}")],
        )
        assert (reply.width, reply.height, len(reply.data)) == (64, 48, 64 * 48)


def test_the_drop_in_endpoints_need_the_key_in_their_own_way(secured: str) -> None:
    """remove.bg clients send ``X-Api-Key`` and get remove.bg's 403; rembg's route takes the
    service's bearer key and answers 401 as FastAPI does; both serve with the key."""
    image = encode(product_frame(64, 48), "PNG")

    def removebg(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{secured}/v1.0/removebg",
            files={"image_file": ("frame.png", image, "image/png")},
            headers=headers,
            timeout=120,
        )

    for headers in ({}, {"X-Api-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        refused = removebg(headers)
        assert refused.status_code == 403, (headers, refused.text[:300])
        assert refused.json()["errors"][0]["code"] == "auth_failed"
    for headers in ({"X-Api-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        served = removebg(headers)
        assert served.status_code == 200, headers
        assert served.headers["content-type"] == "image/png"
        assert (served.headers["X-Width"], served.headers["X-Height"]) == ("64", "48")

    def rembg(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{secured}/api/remove",
            files={"file": ("frame.png", image, "image/png")},
            headers=headers,
            timeout=120,
        )

    refused = rembg({})
    assert refused.status_code == 401 and "detail" in refused.json()
    assert rembg({"X-Api-Key": "wrong"}).status_code == 401
    served = rembg({"Authorization": f"Bearer {KEY}"})
    assert served.status_code == 200 and served.content.startswith(b"\x89PNG")


# Last in this module: it deploys the main application alone, which removes "secured".
def test_a_router_whose_key_variable_is_missing_refuses_to_start(cluster: Cluster) -> None:
    """Auth never fails open: a node without the key fails the deploy, naming the variable."""
    config = cluster.app_config()
    app = config["applications"][0]
    keyless = {
        **app,
        "name": "keyless",
        "route_prefix": "/keyless",
        "args": {**app["args"], "router": {**app["args"]["router"], "api_key_env": "NO_SUCH_KEY"}},
    }
    config["applications"] = [app, keyless]
    cluster.deploy(config, "keyless.yaml")
    try:
        deadline = time.monotonic() + 240
        status: dict = {}
        while time.monotonic() < deadline:
            status = cluster.status()["applications"].get("keyless", {})
            if status.get("status") == "DEPLOY_FAILED":
                break
            time.sleep(2)
        assert status.get("status") == "DEPLOY_FAILED", status
        assert "NO_SUCH_KEY" in str(status), status
        assert httpx.get(f"{cluster.url}/keyless/v1/models", timeout=30).status_code != 200
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")
