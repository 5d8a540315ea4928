"""The client layer on its own: no torch, no Ray, against the running demo app.

``segment-video --server`` runs in a separate interpreter. By default that is this
environment's Python with torch, Ray and the service's packages made unimportable (an import
of any of them fails the run); CI points ``CLIENT_PYTHON`` at a fresh virtualenv where only
``pip install '.[video]'`` was installed, which proves the declared dependencies too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.conftest import REPO_ROOT, assert_cutout, product_frame, write_video
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

#: Packages the client layer must never import.
SERVER_SIDE = (
    "torch",
    "torchvision",
    "ray",
    "transformers",
    "ultralytics",
    "segmentation",
    "segmentation_service",
    "segmentation_pipelines",
    "segmentation_standins",
)

_RUN = """
import importlib.abc, json, sys

BLOCKED = {blocked!r}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the client layer imported {{name}}")
        return None


if {block}:
    sys.meta_path.insert(0, Refuse())
from segmentation_client.segment_video import main

code = main(sys.argv[1:])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
print(json.dumps({{"code": code, "loaded": loaded}}))
"""


def _client_python() -> tuple[str, bool]:
    """The interpreter to run the client in, and whether server packages must be blocked."""
    configured = os.environ.get("CLIENT_PYTHON")
    return (configured, False) if configured else (sys.executable, True)


def test_segment_video_through_the_service_imports_neither_torch_nor_ray(
    cluster: Cluster, tmp_path: Path
) -> None:
    frames = write_video(tmp_path / "clip.mov", [product_frame(96, 64, seed=i) for i in range(6)])
    python, block = _client_python()
    out = tmp_path / "frames"
    script = _RUN.format(blocked=SERVER_SIDE, block=block)
    env = {**os.environ, "PYTHONPATH": "" if not block else str(REPO_ROOT)}
    args = [str(tmp_path / "clip.mov"), "-o", str(out), "--server", cluster.url, "--no-progress"]
    run = subprocess.run(
        [python, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}, run.stderr
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == len(frames)
    for png, frame in zip(written, frames, strict=True):
        assert_cutout(np.asarray(PILImage.open(png)), frame)


_UNREACHABLE = """
import importlib.abc, json, socket, sys, time

BLOCKED = {blocked!r}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the client layer imported {{name}}")
        return None


if {block}:
    sys.meta_path.insert(0, Refuse())
from segmentation_client import SegmentorClient, ServiceUnreachable

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % probe.getsockname()[1]
started = time.monotonic()
try:
    with SegmentorClient(url) as client:
        client.remove_background(b"\\x89PNG")
    raised = None
except ServiceUnreachable as exc:
    raised = [type(exc).__name__, exc.status, exc.code, type(exc.__cause__).__name__]
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
print(json.dumps({{"raised": raised, "seconds": time.monotonic() - started, "loaded": loaded}}))
"""


def test_an_unreachable_service_fails_in_seconds_without_server_packages(tmp_path: Path) -> None:
    """No service at the URL: the client says so within its connect timeout (5 s), with the
    same error as over gRPC, and its error path imports nothing of the server's."""
    python, block = _client_python()
    script = _UNREACHABLE.format(blocked=SERVER_SIDE, block=block)
    env = {**os.environ, "PYTHONPATH": "" if not block else str(REPO_ROOT)}
    run = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["raised"] == ["ServiceUnreachable", 503, "unreachable", "ConnectError"]
    assert report["loaded"] == []
    assert report["seconds"] < 5.0 + 1.5
