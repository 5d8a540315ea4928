"""Requests that once exhausted a router, locked others out or got a 500, sent to the running
demo app: each gets a 4xx, 503 with Retry-After or 504, and the router stays small."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import httpx
import pytest
from PIL import Image

from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_client.proto.segmentor_pb2_grpc import SegmentorStub
from tests.conftest import encode, product_frame
from tests.integration.conftest import BODY_TIMEOUT_S, GRPC_MAX_MESSAGE, MAX_BODY
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration
#: How much a router process's peak memory may grow while it refuses one of these requests.
ROUTER_GROWTH_LIMIT = 200 * 1024 * 1024


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def _models(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models: dict[str, Any] = response.json()
    return models


@pytest.fixture()
def router_peak(client: Any) -> Iterator[list[int]]:
    """The router's peak memory before the test; after it, asserted within the limit."""
    pid = _models(client)["router"]["pid"]
    before = _peak_rss(pid)
    yield [pid]
    grown = _peak_rss(pid) - before
    assert grown < ROUTER_GROWTH_LIMIT, f"router peak memory grew by {grown / 2**20:.0f} MiB"


def _rmbg_frames(client: httpx.Client) -> int:
    rmbg = next(m for m in _models(client)["models"] if "rmbg" in m["name"].lower())
    return int(sum(rmbg["frames"].values()))


def test_products_with_a_thousand_boxes_is_refused_before_any_crop(
    client: httpx.Client, router_peak: list[int]
) -> None:
    body = encode(product_frame(1920, 1080, seed=3), "PNG")
    rmbg_before = _rmbg_frames(client)
    started = time.monotonic()
    response = client.post(
        "/v1/products",
        params={"conf": 0, "iou": 1, "max_det": 300, "margin": 1},
        content=body,
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 413, response.text
    assert "router.max_products" in response.json()["error"]["message"]
    assert time.monotonic() - started < 30
    assert _rmbg_frames(client) == rmbg_before  # no cutout was started
    too_many = client.post(
        "/v1/products",
        params={"max_det": 1000},
        content=body,
        headers={"Content-Type": "image/png"},
    )
    assert too_many.status_code == 422 and "router.max_det" in too_many.text


def test_frames_that_decode_to_too_many_pixels_are_refused_from_their_headers(
    client: httpx.Client, router_peak: list[int]
) -> None:
    """64 blank 6320x6320 PNGs are ~3 MB on the wire and 7.7 GB of pixels."""
    buffer = io.BytesIO()
    Image.new("L", (6320, 6320)).save(buffer, "PNG", optimize=True)
    blank = buffer.getvalue()
    count = min(64, MAX_BODY // (len(blank) + 512))
    assert count >= 8
    files = [("frames", (f"f{i}.png", blank, "image/png")) for i in range(count)]
    started = time.monotonic()
    response = client.post("/v1/frames", params={"task": "segment"}, files=files)
    assert response.status_code == 413, response.text
    assert "max_request_pixels" in response.json()["error"]["message"]
    assert time.monotonic() - started < 20


def _stalled_upload(url: str, path: str = "/v1/remove-background") -> socket.socket:
    """A connection that sends headers announcing 1 MB and only 10 bytes of it."""
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parsed.hostname}\r\n"
        "Content-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\x89PNG\r\n\x1a\n..")
    return sock


def _read_answer(sock: socket.socket) -> str:
    """An HTTP answer off a raw socket: the headers and the body they announce."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_stalled_uploads_hold_no_admission_and_get_408(cluster: Cluster, client: Any) -> None:
    stalled = [_stalled_upload(cluster.url) for _ in range(6)]
    try:
        # Served while the uploads are open: they hold no frame of the budget.
        response = client.post(
            "/v1/remove-background",
            params={"output": "mask"},
            content=encode(product_frame(64, 48), "PNG"),
            headers={"Content-Type": "image/png"},
        )
        assert response.status_code == 200
        started = time.monotonic()
        answer = _read_answer(stalled[0])
        waited = time.monotonic() - started
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert "router.body_timeout_s" in answer
        assert waited < BODY_TIMEOUT_S + 10
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"X-Request-Timeout-Ms": "9" * 400}, 422, "invalid_request"),
        ({"X-Request-Timeout-Ms": "0"}, 422, "invalid_request"),
        ({"Authorization": "Bearer \u00e9\u00e8".encode("latin-1")}, 200, None),  # no key: served
    ],
)
def test_odd_headers_get_a_4xx_never_a_500(
    client: httpx.Client, headers: dict[str, Any], status: int, code: str | None
) -> None:
    response = client.post(
        "/v1/remove-background",
        params={"output": "mask"},
        content=encode(product_frame(64, 48), "PNG"),
        headers={"Content-Type": "image/png", **headers},
    )
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[SegmentorStub]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(cluster.grpc_target, options=options) as channel:
        yield SegmentorStub(channel)


def test_grpc_messages_over_the_limit_stop_at_the_proxy(stub: SegmentorStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.RemoveBackground(pb.ImageRequest(image=b"\0" * (GRPC_MAX_MESSAGE + 1)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_keeps_the_request_deadline_like_http(stub: SegmentorStub) -> None:
    frames = [encode(product_frame(640, 480, seed=i), "JPEG") for i in range(64)]
    request = pb.FramesRequest(frames=frames, task=pb.TASK_REMOVE_BACKGROUND)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Frames(request, timeout=60, metadata=[("x-request-timeout-ms", "200")])
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    with pytest.raises(grpc.RpcError) as bad:
        stub.Frames(request, timeout=60, metadata=[("x-request-timeout-ms", "9" * 400)])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_black_box_round_of_hostile_requests_gets_no_500(
    cluster: Cluster, client: httpx.Client, router_peak: list[int]
) -> None:
    png = encode(product_frame(320, 240), "PNG")

    async def hostile() -> list[int]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as http:
            calls = [
                http.post(
                    "/v1/segment",
                    params={"classes": "1" + "0" * 30},
                    content=png,
                    headers={"Content-Type": "image/png"},
                ),
                http.post(
                    "/v1/segment",
                    params={"max_det": 5000},
                    content=png,
                    headers={"Content-Type": "image/png"},
                ),
                http.post(
                    "/v1/remove-background",
                    content=b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
                    headers={"Content-Type": "image/png"},
                ),
                http.post("/v1/frames", files=[("frames", ("a.png", b"junk", "image/png"))]),
                http.post(
                    "/v1/products",
                    content=png[: len(png) // 2],
                    headers={"Content-Type": "image/png"},
                ),
                http.get(
                    "/v1/models", headers={"Authorization": "Bearer \u00ff".encode("latin-1")}
                ),
            ]
            answers = await asyncio.gather(*calls)
            return [a.status_code for a in answers]

    statuses = asyncio.run(hostile())
    assert all(s < 500 or s in (503, 504) for s in statuses), statuses
