"""A frame the model cannot take, batched with others over HTTP, fails alone: the model
exception is injected for frames of one pixel value (the stand-in takes any frame)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from tests.conftest import encode, product_frame
from tests.integration.conftest import post_masks
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

POISON = 7


@pytest.fixture(scope="module")
def isolation_url(cluster: Cluster) -> Iterator[str]:
    """The demo plus an application whose RMBG replica fails model calls holding a frame of
    value POISON, and waits long enough for concurrent requests to share one batch."""
    config = cluster.app_config()
    demo = config["applications"][0]
    deployments = [
        {
            **d,
            "user_config": {**d["user_config"], "max_batch_size": 8, "batch_wait_timeout_s": 0.5},
        }
        if d["name"] == "RMBGDeployment"
        else d
        for d in demo["deployments"]
    ]
    args = {**demo["args"], "rmbg": {**demo["args"]["rmbg"], "fault_fail_frame_value": POISON}}
    app = {
        **demo,
        "name": "isolation",
        "route_prefix": "/isolation",
        "args": args,
        "deployments": deployments,
    }
    config["applications"] = [demo, app]
    cluster.deploy(config, "isolation.yaml")
    url = f"{cluster.url}/isolation"
    try:
        cluster.wait_ready_at(url)
        yield url
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")


def test_the_poisoned_frame_gets_400_and_the_seven_batched_with_it_their_mattes(
    cluster: Cluster, isolation_url: str
) -> None:
    frames = [product_frame(96, 64, seed=300 + i) for i in range(8)]
    frames[5] = np.full((64, 96, 3), POISON, dtype=np.uint8)
    responses = asyncio.run(post_masks(isolation_url, [encode(f, "PNG") for f in frames]))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 5 + [400] + [200] * 2
    error = responses[5].json()["error"]
    assert error["code"] == "frame_rejected"
    assert f"value {POISON}" in error["message"]
    served = cluster.app_config()["applications"][0]["args"]["rmbg"]  # the model it serves
    reference = RMBG20Segmentor(served["model"], device="cpu", input_size=served["input_size"])
    for index, (response, frame) in enumerate(zip(responses, frames, strict=True)):
        if index == 5:
            continue
        mask = np.asarray(Image.open(io.BytesIO(response.content)))
        expected = reference.predict([frame])[0]
        assert np.abs(mask.astype(int) - expected.astype(int)).max() <= 2
    rmbg = next(
        m
        for m in httpx.get(f"{isolation_url}/v1/models", timeout=60).json()["models"]
        if m["name"] == "rmbg-2.0"
    )
    assert rmbg["batch"]["error_splits"] >= 1, "the poisoned frame was never batched with others"
    assert rmbg["frames"]["bad_input"] == 1
    assert rmbg["frames"]["ok"] == 7
    assert rmbg["frames"]["error"] == 0
