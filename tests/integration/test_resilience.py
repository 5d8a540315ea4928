"""Overload and OOM over HTTP: a GPU out-of-memory error is injected in the running app
(a CPU cannot run out of GPU memory); every frame must still be answered correctly."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def apps(cluster: Cluster) -> Iterator[dict[str, str]]:
    """Two more applications beside the demo: one with OOM injected above batch 1, one whose
    router holds at most 3 frames at a time and sends JPEGs undecoded to the YOLO replica."""
    config = cluster.app_config()
    demo = config["applications"][0]

    def variant(name: str, args: dict[str, Any], rmbg_user_config: dict[str, Any]) -> dict:
        deployments = [
            {**d, "user_config": {**d["user_config"], **rmbg_user_config}}
            if d["name"] == "RMBGDeployment"
            else d
            for d in demo["deployments"]
        ]
        merged = {k: {**demo["args"][k], **args.get(k, {})} for k in demo["args"]}
        return {
            **demo,
            "name": name,
            "route_prefix": f"/{name}",
            "args": merged,
            "deployments": deployments,
        }

    config["applications"] = [
        demo,
        variant(
            "oom",
            {"rmbg": {"fault_oom_above_batch": 1}},
            {"max_batch_size": 4, "batch_wait_timeout_s": 0.2, "oom_recover_after": 1000},
        ),
        variant("edge", {"router": {"max_inflight_frames": 3, "device_jpeg_decode": True}}, {}),
    ]
    cluster.deploy(config, "resilience.yaml")
    urls = {name: f"{cluster.url}/{name}" for name in ("oom", "edge")}
    try:
        for url in urls.values():
            cluster.wait_ready_at(url)
        yield urls
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")


async def _burst(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        return await asyncio.gather(
            *(
                http.post(
                    f"{url}/v1/remove-background",
                    params={"output": "mask"},
                    content=body,
                    headers={"Content-Type": "image/png"},
                )
                for body in bodies
            )
        )


def test_injected_oom_splits_batches_and_every_frame_is_answered_correctly(
    apps: dict[str, str],
) -> None:
    frames = [product_frame(96, 64, seed=100 + i) for i in range(12)]
    responses = asyncio.run(_burst(apps["oom"], [encode(f, "PNG") for f in frames]))
    assert [r.status_code for r in responses] == [200] * 12
    reference = RMBG20Segmentor(standins.RMBG_STANDIN, device="cpu", input_size=256)
    for response, frame in zip(responses, frames, strict=True):
        mask = np.asarray(Image.open(io.BytesIO(response.content)))
        expected = reference.predict([frame])[0]
        assert np.abs(mask.astype(int) - expected.astype(int)).max() <= 2
    rmbg = next(
        m
        for m in httpx.get(f"{apps['oom']}/v1/models", timeout=60).json()["models"]
        if m["name"] == "rmbg-2.0"
    )
    assert rmbg["batch"]["oom_splits"] >= 1, "no batch larger than one was formed"
    assert rmbg["batch"]["live_cap"] == 1  # dropped from 4
    assert rmbg["batch"]["largest_batch"] == 1


def test_overload_gets_503_with_retry_after_and_nothing_is_lost(apps: dict[str, str]) -> None:
    bodies = [encode(product_frame(320, 240, seed=i), "PNG") for i in range(16)]
    responses = asyncio.run(_burst(apps["edge"], bodies))
    statuses = [r.status_code for r in responses]
    assert len(statuses) == 16 and set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "overloaded"


def test_jpegs_decoded_next_to_the_model_and_a_corrupt_one_fails_alone(
    apps: dict[str, str],
) -> None:
    good = encode(product_frame(200, 120, seed=7), "JPEG", quality=95)
    corrupt = good[: len(good) // 3]  # a valid header, truncated data: fails in the replica
    files = [
        ("frames", ("0.jpg", good, "image/jpeg")),
        ("frames", ("1.jpg", corrupt, "image/jpeg")),
        ("frames", ("2.png", encode(product_frame(90, 60), "PNG"), "image/png")),
    ]
    response = httpx.post(
        f"{apps['edge']}/v1/frames", params={"task": "segment"}, files=files, timeout=120
    )
    assert response.status_code == 200
    frames = response.json()["frames"]
    assert (frames[0]["width"], frames[0]["height"]) == (200, 120)
    assert frames[0]["instances"]
    assert frames[1]["error"]["code"] == "invalid_image"
    assert (frames[2]["width"], frames[2]["height"]) == (90, 60)
    single = httpx.post(
        f"{apps['edge']}/v1/segment",
        content=good,
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )
    assert single.status_code == 200
    assert (single.json()["width"], single.json()["height"]) == (200, 120)


def test_client_retries_overload_until_every_frame_is_answered(apps: dict[str, str]) -> None:
    """The router admits 3 frames at a time; a client with 16 in flight gets 503s, waits as
    Retry-After says, and ends with every matte, correct and in order."""
    from segmentation_client.client import AsyncSegmentorClient, RetryPolicy

    frames = [product_frame(160, 120, seed=200 + i) for i in range(16)]

    async def run() -> tuple[list[np.ndarray], int]:
        retry = RetryPolicy(attempts=30, max_wait_s=2.0)
        async with AsyncSegmentorClient(
            apps["edge"], max_concurrency=16, retry=retry, frame_format="png"
        ) as client:
            mattes = await asyncio.gather(
                *(client.remove_background(f, output="mask") for f in frames)
            )
            return [m.to_array() for m in mattes], client.retries

    mattes, retries = asyncio.run(run())
    assert retries > 0, "the router never pushed back; the test proves nothing"
    reference = RMBG20Segmentor(standins.RMBG_STANDIN, device="cpu", input_size=256)
    for matte, frame in zip(mattes, frames, strict=True):
        expected = reference.predict([frame])[0]
        assert np.abs(matte.astype(int) - expected.astype(int)).max() <= 2
