"""Batching under concurrency, live user_config changes, and deploy-time config errors."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration


def models(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


async def _burst(url: str, path: str, count: int) -> list[int]:
    body = encode(product_frame(128, 96), "PNG")
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        responses = await asyncio.gather(
            *(
                http.post(path, content=body, headers={"Content-Type": "image/png"})
                for _ in range(count)
            )
        )
    return [r.status_code for r in responses]


@pytest.mark.parametrize(
    ("path", "model"), [("/v1/remove-background", "rmbg-2.0"), ("/v1/segment", "yolo11-seg")]
)
def test_concurrent_requests_form_batches(
    cluster: Cluster, client: httpx.Client, path: str, model: str
) -> None:
    before = models(client)[model]["batch"]
    statuses = asyncio.run(_burst(cluster.url, path, 24))
    assert statuses == [200] * 24
    after = models(client)[model]["batch"]
    # Model calls of more than one frame during this burst (not in the replica's lifetime).
    calls = {
        int(size): count - before["model_calls_by_size"].get(size, 0)
        for size, count in after["model_calls_by_size"].items()
    }
    assert any(count > 0 for size, count in calls.items() if size > 1), calls
    assert max(size for size, count in calls.items() if count > 0) <= after["max_batch_size"]
    # fewer model calls than requests: frames shared batches
    assert after["batches_run"] - before["batches_run"] < 24


def _with_user_config(config: dict[str, Any], deployment: str, **user_config: Any) -> dict:
    for entry in config["applications"][0]["deployments"]:
        if entry["name"] == deployment:
            entry["user_config"] = {**entry["user_config"], **user_config}
    return config


def _wait_for(predicate: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError("condition not reached in time")


def test_user_config_changes_live_without_restart(cluster: Cluster, client: httpx.Client) -> None:
    pid = models(client)["yolo11-seg"]["pid"]
    config = _with_user_config(
        cluster.app_config(), "YoloDeployment", max_batch_size=3, batch_wait_timeout_s=0.05
    )
    cluster.deploy(config, "live-change.yaml")
    try:
        _wait_for(lambda: models(client)["yolo11-seg"]["batch"]["max_batch_size"] == 3)
        info = models(client)["yolo11-seg"]
        assert info["pid"] == pid, "the replica was restarted"
        assert info["batch"]["batch_wait_timeout_s"] == 0.05
        assert info["batch"]["live_cap"] == 3
        calls_before = info["batch"]["model_calls_by_size"]
        statuses = asyncio.run(_burst(cluster.url, "/v1/segment", 12))
        assert statuses == [200] * 12
        batch = models(client)["yolo11-seg"]["batch"]
        new_calls = {
            int(size): count - calls_before.get(size, 0)
            for size, count in batch["model_calls_by_size"].items()
            if count > calls_before.get(size, 0)
        }
        # every model call since the change held at most 3 frames: 12 frames took 4 or more
        assert new_calls and max(new_calls) <= 3, new_calls
        assert sum(size * n for size, n in new_calls.items()) == 12
        assert 1 <= batch["largest_batch_since_config"] <= 3
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")
        _wait_for(lambda: models(client)["yolo11-seg"]["batch"]["max_batch_size"] == 8)


def test_invalid_config_fails_at_deploy_time_with_a_clear_message(
    cluster: Cluster, client: httpx.Client
) -> None:
    config = cluster.app_config()
    good = config["applications"][0]
    bad_args = {
        **good,
        "name": "bad-args",
        "route_prefix": "/bad-args",
        "args": {**good["args"], "rmbg": {"model": "x", "colour": "blue"}},
    }
    deployments = [
        {**d, "user_config": {"max_batch_size": 0}} if d["name"] == "YoloDeployment" else d
        for d in good["deployments"]
    ]
    bad_user_config = {
        **good,
        "name": "bad-batch",
        "route_prefix": "/bad-batch",
        "deployments": deployments,
    }
    config["applications"] = [good, bad_args, bad_user_config]
    cluster.deploy(config, "bad.yaml")
    try:

        def failed() -> bool:
            apps = cluster.status()["applications"]
            names = ("bad-args", "bad-batch")
            return all(apps.get(n, {}).get("status") == "DEPLOY_FAILED" for n in names)

        _wait_for(failed, timeout_s=240)
        apps = cluster.status()["applications"]
        assert "args.rmbg.colour" in apps["bad-args"]["message"]
        assert "invalid product-segmentor arguments" in apps["bad-args"]["message"]
        yolo_status = apps["bad-batch"]["deployments"]["YoloDeployment"]["message"]
        assert "max_batch_size" in yolo_status and "greater than or equal to 1" in yolo_status
        # the running application is untouched
        assert client.get("/healthz").status_code == 200
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")
