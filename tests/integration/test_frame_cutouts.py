"""Cutout options on every path that removes backgrounds: ``/v1/frames`` and gRPC's
RemoveBackground and Frames compose exactly what ``/v1/remove-background`` composes."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image as PILImage

from segmentation_client.client import FrameError, Image, SegmentorClient, ServiceError
from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_client.proto.segmentor_pb2_grpc import SegmentorStub
from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

#: Options that change every step: edges refined, a translucent background, cropped with a
#: margin past the frame's edge, lossless WebP.
COMPOSED: dict[str, Any] = {
    "refine": True,
    "background": "81d4fa77",
    "crop": True,
    "crop_margin": "40%",
    "format": "webp",
    "lossless": True,
}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)))


def single(client: httpx.Client, body: bytes, params: dict[str, Any]) -> httpx.Response:
    response = client.post(
        "/v1/remove-background",
        params=params,
        content=body,
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    return response


def frames_call(client: httpx.Client, bodies: list[bytes], params: dict[str, Any]) -> Any:
    files = [("frames", (f"f{i}.png", b, "image/png")) for i, b in enumerate(bodies)]
    return client.post("/v1/frames", params=params, files=files)


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[SegmentorStub]:
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        yield SegmentorStub(channel)


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    return [encode(product_frame(160, 120, seed=s), "PNG") for s in (21, 22)]


def box_of(header: str) -> list[int]:
    return [int(v) for v in header.split(",")]


def test_frames_compose_each_frame_as_the_single_image_route_does(
    client: httpx.Client, bodies: list[bytes]
) -> None:
    answer = frames_call(client, bodies, COMPOSED)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["frames"]
    assert [e["index"] for e in entries] == [0, 1]
    for body, entry in zip(bodies, entries, strict=True):
        one = single(client, body, COMPOSED)
        assert one.headers["content-type"] == entry["content_type"] == "image/webp"
        image = pixels(base64.b64decode(entry["image"]))
        assert np.array_equal(image, pixels(one.content))
        assert (entry["width"], entry["height"]) == (image.shape[1], image.shape[0])
        assert entry["cutout_box"] == box_of(one.headers["x-cutout-box"])
        left, top, right, bottom = entry["cutout_box"]
        assert (right - left, bottom - top) == (entry["width"], entry["height"])
        # A 40% margin of a subject filling most of a 160x120 frame reaches past its edge,
        # where the translucent background alone shows.
        assert left < 0 or top < 0 or right > 160 or bottom > 120


def test_frames_without_options_stay_plain_pngs_at_the_frame_size(
    client: httpx.Client, bodies: list[bytes]
) -> None:
    entries = frames_call(client, bodies, {}).json()["frames"]
    for body, entry in zip(bodies, entries, strict=True):
        assert entry["content_type"] == "image/png"
        assert (entry["width"], entry["height"]) == (160, 120)
        assert entry["cutout_box"] is None
        plain = single(client, body, {})
        assert "x-cutout-box" not in plain.headers
        image = pixels(base64.b64decode(entry["image"]))
        assert np.array_equal(image, pixels(plain.content))


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"task": "segment", "refine": "true"}, "task=segment"),
        ({"background": "not-a-colour"}, "not-a-colour"),
        ({"format": "jpeg"}, "jpeg"),
        ({"output": "mask", "refine": "true"}, "output=mask"),
    ],
)
def test_frames_with_options_that_cannot_apply_are_refused_whole(
    client: httpx.Client, bodies: list[bytes], params: dict[str, Any], named: str
) -> None:
    answer = frames_call(client, bodies, params)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["error"]["message"]


def test_grpc_remove_background_takes_the_same_options(
    cluster: Cluster, client: httpx.Client, stub: SegmentorStub, bodies: list[bytes]
) -> None:
    options = pb.CutoutOptions(
        refine=True,
        background="81d4fa77",
        crop=True,
        crop_margin="40%",
        format=pb.WEBP,
        lossless=True,
    )
    reply = stub.RemoveBackground(pb.ImageRequest(image=bodies[0], cutout=options), timeout=120)
    one = single(client, bodies[0], COMPOSED)
    assert reply.media_type == "image/webp"
    assert np.array_equal(pixels(reply.data), pixels(one.content))
    assert list(reply.cutout_box) == box_of(one.headers["x-cutout-box"])
    jpeg = stub.RemoveBackground(
        pb.ImageRequest(
            image=bodies[0], cutout=pb.CutoutOptions(background="white", format=pb.JPEG, quality=80)
        ),
        timeout=120,
    )
    assert jpeg.media_type == "image/jpeg" and jpeg.data[:2] == b"\xff\xd8"
    assert pixels(jpeg.data).shape == (120, 160, 3)


def test_grpc_refuses_options_that_cannot_apply_with_invalid_argument(
    stub: SegmentorStub, bodies: list[bytes]
) -> None:
    for request, named in (
        (
            pb.ImageRequest(
                image=bodies[0], output=pb.RAW_ALPHA, cutout=pb.CutoutOptions(crop=True)
            ),
            "output=raw",
        ),
        (pb.ImageRequest(image=bodies[0], cutout=pb.CutoutOptions(format=pb.JPEG)), "jpeg"),
        (
            pb.FramesRequest(
                frames=bodies, task=pb.TASK_SEGMENT, cutout=pb.CutoutOptions(refine=True)
            ),
            "task=segment",
        ),
    ):
        method = stub.Frames if isinstance(request, pb.FramesRequest) else stub.RemoveBackground
        with pytest.raises(grpc.RpcError) as failed:
            method(request, timeout=120)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in (failed.value.details() or "")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_client_sends_cutout_options_on_both_transports(
    cluster: Cluster, client: httpx.Client, bodies: list[bytes], transport: str
) -> None:
    url = cluster.url if transport == "http" else f"grpc://{cluster.grpc_target}"
    singles = [single(client, body, COMPOSED) for body in bodies]
    expected = [(pixels(s.content), tuple(box_of(s.headers["x-cutout-box"]))) for s in singles]
    with SegmentorClient(url) as segmentor:
        one = segmentor.remove_background(bodies[0], **COMPOSED)
        many = segmentor.frames(bodies, **COMPOSED)
        with pytest.raises(ServiceError) as refused:
            segmentor.frames(bodies, background="white", format="jpeg", quality=0)
    assert refused.value.status == (422 if transport == "http" else "INVALID_ARGUMENT")
    assert "quality" in refused.value.message
    assert one.content_type == "image/webp"
    assert (one.cutout_box, np.array_equal(one.to_array(), expected[0][0])) == (
        expected[0][1],
        True,
    )
    for result, (want, box) in zip(many, expected, strict=True):
        assert isinstance(result, Image) and not isinstance(result, FrameError)
        assert (result.content_type, result.cutout_box) == ("image/webp", box)
        assert np.array_equal(result.to_array(), want)


def test_a_crop_margin_that_grows_outputs_past_the_request_limit_is_refused_from_headers(
    client: httpx.Client,
) -> None:
    """Two blank 6320x6320 PNGs decode to 80 M pixels; cropped with a margin of a whole
    subject per side (capped at half of it) each output can be 12640x12640 = 160 M, and two
    of them are over the router's max_request_pixels (300 M): 413 before anything decodes."""
    buffer = io.BytesIO()
    PILImage.new("L", (6320, 6320)).save(buffer, "PNG", optimize=True)
    files = [("frames", (f"f{i}.png", buffer.getvalue(), "image/png")) for i in range(2)]
    response = client.post(
        "/v1/frames", params={"crop": "true", "crop_margin": "100%"}, files=files
    )
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert f"{2 * 12640 * 12640} pixels" in message and "crop_margin" in message
