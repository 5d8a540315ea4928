"""The gRPC API through Serve's gRPC proxy: the same answers as HTTP, the same error model."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import numpy as np
import pytest
from PIL import Image as PILImage

from segmentation_client.client import (
    AsyncSegmentorClient,
    FrameError,
    Segmentation,
    SegmentorClient,
    ServiceError,
)
from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_client.proto.segmentor_pb2_grpc import SegmentorStub
from segmentation_client.segment_video import main as segment_video
from tests.conftest import encode, product_frame, write_video
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(png)))


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[SegmentorStub]:
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        yield SegmentorStub(channel)


def test_remove_background_equals_the_http_answer_in_every_format(
    cluster: Cluster, client: httpx.Client, stub: SegmentorStub
) -> None:
    body = encode(product_frame(160, 120, seed=3), "PNG")
    http_rgba = pixels(
        client.post(
            "/v1/remove-background", content=body, headers={"Content-Type": "image/png"}
        ).content
    )
    rgba = stub.RemoveBackground(pb.ImageRequest(image=body), timeout=120)
    assert (rgba.format, rgba.width, rgba.height) == (pb.RGBA_PNG, 160, 120)
    assert np.array_equal(pixels(rgba.data), http_rgba)
    matte = stub.RemoveBackground(pb.ImageRequest(image=body, output=pb.MATTE_PNG), timeout=120)
    assert np.array_equal(pixels(matte.data), http_rgba[..., 3])
    raw = stub.RemoveBackground(pb.ImageRequest(image=body, output=pb.RAW_ALPHA), timeout=120)
    alpha = np.frombuffer(raw.data, np.uint8).reshape(raw.height, raw.width)
    assert np.array_equal(alpha, http_rgba[..., 3])


def test_segment_instances_equal_the_http_answer(cluster: Cluster, client: httpx.Client) -> None:
    body = encode(product_frame(200, 150, seed=5), "PNG")
    params = {"conf": 0.01, "max_det": 20}
    http = client.post(
        "/v1/segment", params=params, content=body, headers={"Content-Type": "image/png"}
    )
    expected = Segmentation.from_json(http.json())
    with SegmentorClient(f"grpc://{cluster.grpc_target}") as grpc_client:
        found = grpc_client.segment(body, conf=0.01, max_det=20)
    assert found == expected
    assert len(found.instances) > 0


def test_frames_a_corrupt_frame_fails_alone_with_invalid_argument(
    cluster: Cluster, client: httpx.Client, stub: SegmentorStub
) -> None:
    good = [encode(product_frame(96, 64, seed=s), "PNG") for s in (7, 8)]
    request = pb.FramesRequest(frames=[good[0], b"\x89PNG not really", good[1]], output=2)
    reply = stub.Frames(request, timeout=120)
    assert (reply.count, reply.failed) == (3, 1)
    assert [f.index for f in reply.frames] == [0, 1, 2]
    bad = reply.frames[1]
    assert bad.WhichOneof("result") == "error"
    assert (bad.error.status, bad.error.code) == ("INVALID_ARGUMENT", "invalid_image")
    for entry, body in zip((reply.frames[0], reply.frames[2]), good, strict=True):
        http = client.post(
            "/v1/remove-background",
            params={"output": "mask"},
            content=body,
            headers={"Content-Type": "image/png"},
        )
        alpha = np.frombuffer(entry.matte.data, np.uint8).reshape(64, 96)
        assert np.array_equal(alpha, pixels(http.content))
    streamed = list(stub.StreamFrames(request, timeout=120))
    assert streamed == list(reply.frames)


def test_bad_requests_get_their_codes_and_the_service_error_code(
    cluster: Cluster, stub: SegmentorStub
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.RemoveBackground(pb.ImageRequest(image=b"not an image"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata())["error-code"] == "invalid_image"
    body = encode(product_frame(32, 32), "PNG")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Segment(pb.SegmentRequest(image=body, options=pb.DetectOptions(conf=2)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conf=2" in (caught.value.details() or "")
    with SegmentorClient(f"grpc://{cluster.grpc_target}") as grpc_client:
        with pytest.raises(ServiceError) as error:
            grpc_client.remove_background(b"junk")
        results = grpc_client.frames([body, b"junk"], "segment")
    assert (error.value.status, error.value.code) == ("INVALID_ARGUMENT", "invalid_image")
    assert isinstance(results[0], Segmentation)
    assert isinstance(results[1], FrameError) and results[1].code == "invalid_image"


def test_segment_video_over_grpc_writes_the_same_mattes_as_over_http(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_video(tmp_path / "clip.mov", [product_frame(128, 96, seed=60 + i) for i in range(6)])
    outputs = {}
    for scheme, server in (("http", cluster.url), ("grpc", f"grpc://{cluster.grpc_target}")):
        out = tmp_path / scheme
        code = segment_video(
            [str(tmp_path / "clip.mov"), "-o", str(out), "--server", server, "--no-progress"]
        )
        assert code == 0
        outputs[scheme] = sorted(out.glob("frame_*.png"))
    assert len(outputs["grpc"]) == len(outputs["http"]) == 6
    for grpc_png, http_png in zip(outputs["grpc"], outputs["http"], strict=True):
        assert np.array_equal(
            np.asarray(PILImage.open(grpc_png)), np.asarray(PILImage.open(http_png))
        )


def test_the_async_client_answers_every_frame_over_grpc(
    cluster: Cluster,
) -> None:
    bodies = [encode(product_frame(96, 64, seed=s), "PNG") for s in range(6)]

    async def run() -> tuple[list[Any], int]:
        async with AsyncSegmentorClient(
            f"grpc://{cluster.grpc_target}", max_concurrency=6
        ) as client:
            mattes = await asyncio.gather(
                *(client.remove_background(b, output="mask") for b in bodies)
            )
            return [m.alpha() for m in mattes], client.retries

    mattes, retries = asyncio.run(run())
    assert retries == 0  # the demo budget holds six frames
    assert [m.shape for m in mattes] == [(64, 96)] * 6


@pytest.fixture(scope="module")
def tight(cluster: Cluster) -> Iterator[str]:
    """The demo application beside a copy of it (``tight``) whose router admits 2 frames."""
    config = cluster.app_config()
    demo = config["applications"][0]
    router = {**demo["args"]["router"], "max_inflight_frames": 2, "max_frames_per_request": 2}
    deployments = [
        {**d, "ray_actor_options": {**d["ray_actor_options"], "num_cpus": 0.05}}
        for d in demo["deployments"]
    ]
    tight_app: dict[str, Any] = {
        **demo,
        "name": "tight",
        "route_prefix": "/tight",
        "args": {**demo["args"], "router": router},
        "deployments": deployments,
    }
    config["applications"] = [demo, tight_app]
    cluster.deploy(config, "grpc-tight.yaml")
    try:
        cluster.wait_ready_at(f"{cluster.url}/tight")
        yield "tight"
    finally:
        cluster.deploy(cluster.app_config(), "grpc-restore.yaml")


def test_over_the_budget_calls_get_resource_exhausted_with_a_retry_delay(
    cluster: Cluster, tight: str
) -> None:
    body = encode(product_frame(256, 192, seed=9), "PNG")
    metadata = (("application", tight),)

    async def burst() -> list[Any]:
        async with grpc.aio.insecure_channel(cluster.grpc_target) as channel:
            stub = SegmentorStub(channel)
            calls = [
                stub.RemoveBackground(pb.ImageRequest(image=body), metadata=metadata, timeout=120)
                for _ in range(12)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if isinstance(r, pb.ImageReply)]
    assert refused and answered and len(refused) + len(answered) == 12
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(err.trailing_metadata() or ())
        assert trailing["retry-after"] == "1"
        assert trailing["error-code"] == "overloaded"
