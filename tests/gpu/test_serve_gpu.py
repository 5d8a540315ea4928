"""Both deployments on one GPU with fractional requests, batching under concurrent load."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from benchmarks.load_test import run_load
from tests.conftest import REPO_ROOT, RMBG_ARCH_DIR
from tests.serve_cluster import Cluster, running_cluster

pytestmark = pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)


def _models(config: dict[str, Any]) -> None:
    app = config["applications"][0]
    app["args"]["rmbg"]["model"] = str(RMBG_ARCH_DIR.resolve())
    for deployment in app["deployments"]:  # the segmentors' 8 + 2 x 2 CPUs, and 2 Routers
        if deployment["name"] == "Router":
            deployment["num_replicas"] = 2


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        REPO_ROOT / "configs" / "gpu-bench.yaml",
        tmp_path_factory.mktemp("gpu-serve"),
        num_cpus=16,
        num_gpus=1,
        edit=_models,
    ) as cluster:
        yield cluster


def _models_info(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {
        m["name"]: m for m in httpx.get(f"{cluster.url}/v1/models", timeout=30).json()["models"]
    }


def test_two_deployments_share_one_gpu_in_fp16(gpu_cluster: Cluster) -> None:
    info = _models_info(gpu_cluster)
    rmbg, yolo = info["rmbg-2.0"], info["yolo11-seg"]
    print(f"\nrmbg: {rmbg['gpu']} {rmbg['gpu_memory']}\nyolo: {yolo['gpu']} {yolo['gpu_memory']}")
    assert rmbg["precision"] == yolo["precision"] == "fp16"
    assert rmbg["gpu"]["uuid"] == yolo["gpu"]["uuid"]
    assert rmbg["gpu_memory"]["fraction"] == 0.6 and yolo["gpu_memory"]["fraction"] == 0.2
    assert rmbg["gpu_memory"]["allocated_bytes"] > 0 and yolo["gpu_memory"]["allocated_bytes"] > 0
    assert rmbg["batch"]["memory_cap"] >= 1


@pytest.mark.parametrize(
    ("endpoint", "model"), [("remove-background", "rmbg-2.0"), ("segment", "yolo11-seg")]
)
def test_batches_form_under_load(gpu_cluster: Cluster, endpoint: str, model: str) -> None:
    result = asyncio.run(run_load(gpu_cluster.url, endpoint, concurrency=48, duration_s=8))
    batch = _models_info(gpu_cluster)[model]["batch"]
    print(
        f"\n{endpoint}: {result['frames_per_s']} frames/s, latency {result['latency_ms']}, "
        f"largest batch {batch['largest_batch']}, peak memory "
        f"{_models_info(gpu_cluster)[model]['gpu_memory']['peak_bytes'] / 2**30:.2f} GiB"
    )
    assert result["requests_sent"] == result["responses_received"]
    assert set(result["statuses"]) == {"200"}
    assert batch["largest_batch"] > 1
