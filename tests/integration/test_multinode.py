"""Two Ray nodes (CPU): one replica of each deployment per node, an ingress on each node, and
a node lost under load.

The cluster is started as users start one: ``ray start --head``, ``ray start --address`` for
the worker (its own temp dir and process group, so killing it kills that node only), then
``serve deploy`` of the demo app with two replicas of each deployment and at most one per
node (``max_replicas_per_node: 1``). Serve's proxy runs on every node (``proxy_location:
EveryNode``); on one machine the worker's proxy takes the ports its
``RAY_SERVE_WORKER_PROXY_HTTP_PORT``/``_GRPC_PORT`` name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.load_test import synthetic_jpeg
from benchmarks.rollout_bench import Load, counts, per_node, replica_nodes, restored
from tests.conftest import REPO_ROOT
from tests.integration.conftest import GRPC_MAX_MESSAGE
from tests.serve_cluster import (
    Cluster,
    WorkerNode,
    alive_nodes,
    free_port,
    running_cluster,
    start_worker,
)

pytestmark = pytest.mark.integration

APP = "product-segmentor"


@pytest.fixture(scope="module")
def two_nodes(
    tmp_path_factory: pytest.TempPathFactory, standin_cache: Path
) -> Iterator[tuple[Cluster, dict[str, WorkerNode]]]:
    """A head and a worker node of 2 CPUs each and the demo app on both; the dict holds the
    worker node now up (a test replaces it after killing it)."""
    env = {
        "PRODUCT_SEGMENTOR_CACHE": str(standin_cache),
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE),
    }
    with running_cluster(
        REPO_ROOT / "configs" / "demo.yaml",
        tmp_path_factory.mktemp("two-nodes"),
        num_cpus=2,
        extra_env=env,
    ) as cluster:
        nodes = {"worker": start_worker(cluster, num_cpus=2, http_port=free_port())}
        try:
            config = cluster.app_config()
            per_node(config["applications"][0], 2)
            cluster.config = config
            cluster.deploy(config, "two-nodes.yaml")
            _wait_for(lambda: _on_both(cluster, nodes["worker"]), 420, "a replica on each node")
            yield cluster, nodes
        finally:
            nodes["worker"].stop()


def _on_both(cluster: Cluster, worker: WorkerNode) -> bool:
    head = next(n["node_id"] for n in alive_nodes(cluster.dashboard) if n["is_head_node"])
    return restored(cluster.dashboard, APP, {head, worker.node_id})


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(1)


def _frame_served(url: str) -> None:
    frame = synthetic_jpeg(320, 180)
    response = httpx.post(
        f"{url}/v1/remove-background",
        params={"output": "mask"},
        content=frame,
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"


def test_each_node_runs_one_replica_of_each_deployment(
    two_nodes: tuple[Cluster, dict[str, WorkerNode]],
) -> None:
    cluster, nodes = two_nodes
    head = next(n["node_id"] for n in alive_nodes(cluster.dashboard) if n["is_head_node"])
    placed = replica_nodes(cluster.dashboard, APP)
    assert set(placed) == {"RMBGDeployment", "YoloDeployment", "Router"}
    for deployment, where in placed.items():
        assert sorted(where) == sorted([head, nodes["worker"].node_id]), deployment


def test_a_frame_sent_to_either_node_is_served(
    two_nodes: tuple[Cluster, dict[str, WorkerNode]],
) -> None:
    cluster, nodes = two_nodes
    for url in (cluster.url, nodes["worker"].url):
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200, url
        _frame_served(url)


def test_losing_the_worker_node_under_load_loses_no_frame_and_serve_restores_it(
    two_nodes: tuple[Cluster, dict[str, WorkerNode]],
) -> None:
    """SIGKILL of the worker node's processes (its raylet, its replicas, its proxy) while 4
    threads send single frames and /v1/frames requests to the head node's port: the head
    keeps answering, the client's retries lose no frame and no 5xx reaches it; a new worker
    node joins and Serve places the missing replicas on it."""
    cluster, nodes = two_nodes
    old = nodes["worker"]
    frame = synthetic_jpeg(320, 180)
    with Load(cluster.url, threads=4, batch=4, frame=frame, timeout_s=120) as load:
        started = time.monotonic()
        time.sleep(4)
        before = load.between(started, time.monotonic())[0]
        assert sum(c.answered for c in before) > 0, "no load before the kill"
        killed = time.monotonic()
        old.kill()
        time.sleep(15)  # served by the head node alone
        on_head_alone = counts(load, killed, time.monotonic(), 0.0)
        nodes["worker"] = start_worker(
            cluster, num_cpus=2, http_port=int(old.url.rsplit(":", 1)[1])
        )
        old.stop()  # its temp dir
        _wait_for(lambda: _on_both(cluster, nodes["worker"]), 420, "replicas back on the new node")
        time.sleep(3)
        whole = counts(load, killed, time.monotonic(), 0.0)

    print(json.dumps({"head_alone": on_head_alone, "kill_to_restored": whole}))  # with -s
    assert on_head_alone["frames_answered"] > 0, f"the head stopped answering: {on_head_alone}"
    assert whole["frames_lost"] == 0, f"lost: {whole['lost_because']}; {whole}"
    assert whole["calls_5xx_reaching_caller"] == 0, f"{whole['lost_because']}; {whole}"
    assert set(whole["statuses"]) <= {"200", "503"}, f"statuses: {whole['statuses']}"
    _frame_served(nodes["worker"].url)
