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
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(cluster.metrics_url, timeout=10).text
        if not _missing(text):
            break
        time.sleep(3)  # each replica's metrics reach the endpoint on their own schedule
    assert not _missing(text), _missing(text)


def _missing(text: str) -> list[str]:
    """What the exported metrics still lack: each series, for both models."""
    frames = [line for line in text.splitlines() if line.startswith("ray_segmentor_frames_total{")]
    missing = [name for name in EXPECTED if name not in text]
    if not any('model="rmbg-2.0"' in line and 'outcome="ok"' in line for line in frames):
        missing.append("frames_total for rmbg-2.0")
    if not any('model="yolo11-seg"' in line and 'outcome="ok"' in line for line in frames):
        missing.append("frames_total for yolo11-seg")
    missing += [tag for tag in ('stage="model"', 'stage="queue"') if tag not in text]
    return missing
