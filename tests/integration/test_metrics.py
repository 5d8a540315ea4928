"""The custom Serve metrics reach Ray's Prometheus endpoint."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

EXPECTED = (
    "ray_segmentor_frames_total{",
    "ray_segmentor_batch_size_bucket{",
    "ray_segmentor_stage_latency_ms_bucket{",
    "ray_segmentor_batch_cap{",
)


def test_segmentor_metrics_are_exported(cluster: Cluster, client: httpx.Client) -> None:
    body = encode(product_frame(64, 48), "PNG")
    for _ in range(3):
        assert (
            client.post(
                "/v1/remove-background", content=body, headers={"Content-Type": "image/png"}
            ).status_code
            == 200
        )
        assert (
            client.post(
                "/v1/segment", content=body, headers={"Content-Type": "image/png"}
            ).status_code
            == 200
        )
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(cluster.metrics_url, timeout=10).text
        if all(name in text for name in EXPECTED):
            break
        time.sleep(3)
    lines = [line for line in text.splitlines() if line.startswith("ray_segmentor_frames_total{")]
    assert lines, "ray_segmentor_frames_total not exported"
    assert any('model="rmbg-2.0"' in line and 'outcome="ok"' in line for line in lines)
    assert any('model="yolo11-seg"' in line for line in lines)
    for name in EXPECTED[1:]:
        assert name in text, f"{name} not exported"
    assert 'stage="model"' in text and 'stage="queue"' in text
