"""Overload, OOM and lost replicas over HTTP: a GPU out-of-memory error is injected in the
running app (a CPU cannot run out of GPU memory), a replica process is killed mid-stream, a
model's weights are missing; every frame must still be answered correctly, or the deploy must
fail saying why."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation_client import RetryPolicy, SegmentorClient
from tests.conftest import encode, product_frame
from tests.integration.conftest import post_masks
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def resilience_config(cluster: Cluster) -> dict[str, Any]:
    """The demo application and three variants of it: one with OOM injected above batch 1,
    one whose router holds at most 3 frames at a time and sends JPEGs undecoded to the YOLO
    replica, and one whose RMBG replica a test kills (its actors ask for almost no CPU, so the
    four applications fit the test cluster's 4 CPUs)."""
    config = cluster.app_config()
    demo = config["applications"][0]
    config["applications"] = [
        demo,
        _variant(
            demo,
            "oom",
            {"rmbg": {"fault_oom_above_batch": 1}},
            {"max_batch_size": 4, "batch_wait_timeout_s": 0.2, "oom_recover_after": 1000},
        ),
        _variant(
            demo,
            "edge",
            {
                "router": {
                    "max_inflight_frames": 3,
                    "max_frames_per_request": 3,
                }
            },
        ),
        _variant(demo, "crash", {}, cpus=0.05),
    ]
    return config


@pytest.fixture(scope="module")
def apps(cluster: Cluster, resilience_config: dict[str, Any]) -> Iterator[dict[str, str]]:
    cluster.deploy(resilience_config, "resilience.yaml")
    urls = {name: f"{cluster.url}/{name}" for name in ("oom", "edge", "crash")}
    try:
        for url in urls.values():
            cluster.wait_ready_at(url)
        yield urls
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")


def _variant(
    demo: dict[str, Any],
    name: str,
    args: dict[str, Any],
    rmbg_user_config: dict[str, Any] | None = None,
    cpus: float | None = None,
) -> dict[str, Any]:
    """The demo application under another name and route, with some arguments changed."""
    deployments = []
    for d in demo["deployments"]:
        d = {**d}
        if d["name"] == "RMBGDeployment":
            d["user_config"] = {**d["user_config"], **(rmbg_user_config or {})}
        if cpus is not None:
            d["ray_actor_options"] = {**d["ray_actor_options"], "num_cpus": cpus}
        deployments.append(d)
    merged = {k: {**demo["args"][k], **args.get(k, {})} for k in demo["args"]}
    return {
        **demo,
        "name": name,
        "route_prefix": f"/{name}",
        "args": merged,
        "deployments": deployments,
    }


def test_injected_oom_splits_batches_and_every_frame_is_answered_correctly(
    apps: dict[str, str],
) -> None:
    frames = [product_frame(96, 64, seed=100 + i) for i in range(12)]
    responses = asyncio.run(post_masks(apps["oom"], [encode(f, "PNG") for f in frames]))
    assert [r.status_code for r in responses] == [200] * 12
    reference = RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=256)
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
    """16 frames at once on a router that holds 3: the rest are refused with 503 and
    Retry-After, and sending each refused frame again (as told) brings every matte back,
    correct, none lost or swapped."""
    frames = [product_frame(320, 240, seed=i) for i in range(16)]
    bodies = [encode(f, "PNG") for f in frames]
    responses = asyncio.run(post_masks(apps["edge"], bodies))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
    answers: dict[int, httpx.Response] = {
        i: r for i, r in enumerate(responses) if r.status_code == 200
    }
    for _ in range(30):
        missing = [i for i in range(len(frames)) if i not in answers]
        if not missing:
            break
        time.sleep(1.0)  # the Retry-After the router asked for
        again = asyncio.run(post_masks(apps["edge"], [bodies[i] for i in missing]))
        answers.update({i: r for i, r in zip(missing, again, strict=True) if r.status_code == 200})
    assert sorted(answers) == list(range(len(frames))), "some frames never got an answer"
    _assert_mattes_match([_png(answers[i].content) for i in range(len(frames))], frames)


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _assert_mattes_match(mattes: list[np.ndarray], frames: list[np.ndarray]) -> None:
    """Each matte is the stand-in RMBG's own for its frame (FP32 on the CPU, PNG-rounded)."""
    reference = RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=256)
    for index, (matte, frame) in enumerate(zip(mattes, frames, strict=True)):
        expected = reference.predict([frame])[0]
        assert matte.shape == expected.shape, f"frame {index}"
        assert np.abs(matte.astype(int) - expected.astype(int)).max() <= 2, f"frame {index}"


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
    reference = RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=256)
    for matte, frame in zip(mattes, frames, strict=True):
        expected = reference.predict([frame])[0]
        assert np.abs(matte.astype(int) - expected.astype(int)).max() <= 2


class _RecordingClient(SegmentorClient):
    """The project's client, noting every answer it gets (retried ones included)."""

    def _open(self, limits: httpx.Limits) -> None:
        super()._open(limits)
        self.answers: list[tuple[int, str | None, str]] = []
        self._lock = threading.Lock()
        self._http.event_hooks["response"].append(self._note)

    def _note(self, response: httpx.Response) -> None:
        response.read()
        code = response.json()["error"]["code"] if response.status_code != 200 else ""
        with self._lock:
            self.answers.append((response.status_code, response.headers.get("Retry-After"), code))


def _rmbg_pid(url: str) -> int | None:
    """The process id of the application's RMBG replica, or None while it cannot answer."""
    try:
        response = httpx.get(f"{url}/v1/models", timeout=30)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return int(next(m for m in response.json()["models"] if m["name"] == "rmbg-2.0")["pid"])


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(1)


def test_a_replica_killed_mid_stream_loses_no_frame(cluster: Cluster, apps: dict[str, str]) -> None:
    """SIGKILL the RMBG replica while 8 frames are in flight: the router answers the frames it
    held 503 with Retry-After (not 500), Serve starts a new replica, and the client's retries
    bring every matte back, equal to the one computed before the kill."""
    url = apps["crash"]
    frames = [product_frame(160, 120, seed=400 + i) for i in range(48)]
    old_pid = _rmbg_pid(url)
    assert old_pid is not None
    client = _RecordingClient(
        url, max_concurrency=8, retry=RetryPolicy(attempts=60, max_wait_s=3.0), frame_format="png"
    )
    with client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.remove_background, f, output="mask") for f in frames]
        _wait_for(lambda: len(client.answers) >= 6, 120, "six answers before the kill")
        os.kill(old_pid, signal.SIGKILL)  # a replica of the cluster this test session started
        killed_with = sum(not f.done() for f in futures)
        mattes = [f.result(timeout=300).to_array() for f in futures]

    assert killed_with > 8, "the stream ended before the kill; the test proves nothing"
    statuses = [status for status, _, _ in client.answers]
    assert set(statuses) <= {200, 503}, f"answers other than 200 and 503: {statuses}"
    lost = [(retry_after, code) for status, retry_after, code in client.answers if status == 503]
    assert lost, "no frame was in flight at the kill; the test proves nothing"
    assert set(lost) == {("2", "overloaded")}
    assert statuses.count(200) == len(frames)
    assert client.retries == len(lost)
    _assert_mattes_match(mattes, frames)

    new_pid = _rmbg_pid(url)
    assert new_pid is not None and new_pid != old_pid
    _wait_for(
        lambda: cluster.status()["applications"]["crash"]["status"] == "RUNNING",
        120,
        "the application back to RUNNING",
    )


def test_a_model_that_cannot_load_fails_the_deploy_saying_where_to_put_the_weights(
    cluster: Cluster,
    apps: dict[str, str],
    resilience_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    """RMBG-2.0 pointed at a directory that holds no weights (the download was never done):
    the deploy fails, and ``serve status`` says which path and which command fixes it. The
    running applications are untouched."""
    weights = tmp_path / "RMBG-2.0"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    demo = resilience_config["applications"][0]
    broken = _variant(
        demo, "no-weights", {"rmbg": {"model": str(weights), "trust_remote_code": True}}, cpus=0.01
    )
    config = {**resilience_config, "applications": [*resilience_config["applications"], broken]}
    cluster.deploy(config, "no-weights.yaml")
    try:

        def failed() -> bool:
            app = cluster.status()["applications"].get("no-weights", {})
            return bool(app.get("status") == "DEPLOY_FAILED")

        _wait_for(failed, 240, "the deploy failure")
        app = cluster.status()["applications"]["no-weights"]
        message = app["deployments"]["RMBGDeployment"]["message"]
        assert f"{weights} has no model.safetensors" in message
        assert "hf download briaai/RMBG-2.0 --local-dir" in message
        assert httpx.get(f"{apps['crash']}/healthz", timeout=30).status_code == 200
    finally:
        cluster.deploy(resilience_config, "resilience.yaml")
