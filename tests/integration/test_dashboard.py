"""Every metric and label the Grafana dashboard (deploy/grafana/product-segmentor.json) queries
is one that Ray's Prometheus endpoint exports for the running demo application."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_client.proto.segmentor_pb2_grpc import SegmentorStub
from tests.conftest import REPO_ROOT, encode, product_frame
from tests.integration.conftest import post_masks
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "product-segmentor.json"
#: Counted only when FP16 gives non-finite values, and FP16 runs only on CUDA: never on the
#: CPU of these tests. tests/unit/test_deploy_manifests.py checks the name against the
#: metric the replicas declare.
CUDA_ONLY = {"ray_segmentor_fp32_fallbacks_total"}

_NAME = re.compile(r"\b(ray_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(ray_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [
        v["query"]["query"] for v in board["templating"]["list"] if isinstance(v["query"], dict)
    ]
    return queries


def exported(text: str) -> dict[str, set[str]]:
    """Series names on a Prometheus text page, each with the label names it carries."""
    labels: dict[str, set[str]] = defaultdict(set)
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match and not line.startswith("#"):
            labels[match.group(1)].update(_LABEL.findall(match.group(2) or ""))
    return labels


def problems(queries: list[str], labels: dict[str, set[str]]) -> list[str]:
    """What the dashboard asks for that the page lacks: a metric, or a label of one (in a
    selector, or in a ``by (...)`` of an expression using it)."""
    found = []
    for query in queries:
        names = set(_NAME.findall(query)) - CUDA_ONLY
        found += [f"metric {name}" for name in sorted(names) if name not in labels]
        for name, matchers in _SELECTOR.findall(query):
            if name in labels:
                found += [
                    f"label {key} of {name}"
                    for key in _MATCHER.findall(matchers)
                    if key not in labels[name]
                ]
        available = set().union(*(labels.get(name, set()) for name in names)) | {"le"}
        for group in _BY.findall(query):
            for key in (k.strip() for k in group.split(",")):
                if names and key not in available:
                    found.append(f"label {key} in by(...) of {sorted(names)}")
    return sorted(set(found))


@pytest.fixture(scope="module")
def oom_app(cluster: Cluster) -> Iterator[str]:
    """The demo application again at /oom, with GPU OOM injected above batch 1, so batches
    are split and the OOM series exist (a CPU cannot run out of GPU memory)."""
    config = cluster.app_config()
    demo = config["applications"][0]
    deployments: list[dict[str, Any]] = []
    for deployment in demo["deployments"]:
        deployment = {**deployment}
        if deployment["name"] == "RMBGDeployment":
            deployment["user_config"] = {
                **deployment["user_config"],
                "max_batch_size": 4,
                "batch_wait_timeout_s": 0.2,
            }
        deployments.append(deployment)
    oom = {
        **demo,
        "name": "oom",
        "route_prefix": "/oom",
        "args": {**demo["args"], "rmbg": {**demo["args"]["rmbg"], "fault_oom_above_batch": 1}},
        "deployments": deployments,
    }
    config["applications"] = [demo, oom]
    cluster.deploy(config, "dashboard.yaml")
    try:
        cluster.wait_ready_at(f"{cluster.url}/oom")
        yield f"{cluster.url}/oom"
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")


def send_traffic(cluster: Cluster, client: httpx.Client, oom_url: str) -> None:
    """Answers of every kind the dashboard shows: frames of both models, a frame refused by
    its replica, a gRPC call, and batches split after an (injected) OOM."""
    png = encode(product_frame(64, 48), "PNG")
    for path in ("/v1/remove-background", "/v1/segment"):
        answer = client.post(path, content=png, headers={"Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
    # A JPEG whose header is whole and whose data is cut: the router admits it, the replica
    # fails to decode it (outcome bad_input, reason invalid_image).
    jpeg = encode(product_frame(), "JPEG")
    refused = client.post(
        "/v1/segment", content=jpeg[: len(jpeg) // 3], headers={"Content-Type": "image/jpeg"}
    )
    assert refused.status_code == 400, refused.text
    # Two applications share the gRPC port: the call names its own.
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        reply = SegmentorStub(channel).Segment(
            pb.SegmentRequest(image=png),
            metadata=[("application", cluster.config["applications"][0]["name"])],
            timeout=120,
        )
    assert reply.width == 64
    frames = [encode(product_frame(96, 64, seed=i), "PNG") for i in range(12)]
    answers = asyncio.run(post_masks(oom_url, frames))
    assert [a.status_code for a in answers] == [200] * 12


def test_every_metric_the_dashboard_queries_is_exported(
    cluster: Cluster, client: httpx.Client, oom_app: str
) -> None:
    queries = dashboard_queries()
    assert len(queries) > 20, "the dashboard lost its panels"
    send_traffic(cluster, client, oom_app)
    deadline = time.monotonic() + 180
    missing: list[str] = ["nothing scraped yet"]
    while time.monotonic() < deadline:
        labels = exported(httpx.get(cluster.metrics_url, timeout=10).text)
        missing = problems(queries, labels)
        if not missing:
            break
        time.sleep(3)  # each process's metrics reach the endpoint on their own schedule
    assert not missing, missing


def test_the_check_finds_a_metric_or_label_that_is_not_exported() -> None:
    labels = {"ray_x_total": {"model", "application"}}
    assert problems(['sum by (model) (rate(ray_x_total{model="a"}[1m]))'], labels) == []
    assert problems(["ray_y_total"], labels) == ["metric ray_y_total"]
    assert problems(['ray_x_total{stage="q"}'], labels) == ["label stage of ray_x_total"]
    assert problems(["sum by (replica) (ray_x_total)"], labels) == [
        "label replica in by(...) of ['ray_x_total']"
    ]
