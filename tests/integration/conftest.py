"""One real Ray cluster and one Serve application (configs/demo.yaml) per test session.

The application is started the way users start it: ``ray start`` and ``serve deploy`` of the
demo config (stand-in models on the CPU), with only the HTTP port and limits changed.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT

BIN = Path(sys.executable).parent
MAX_BODY = 4 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    url: str
    dashboard: str
    config: dict[str, Any]
    workdir: Path
    env: dict[str, str]

    def deploy(self, config: dict[str, Any], name: str = "config.yaml") -> None:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=120,
        )

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [str(BIN / "serve"), "status", "--address", self.dashboard],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=60,
            text=True,
        ).stdout
        return yaml.safe_load(out)

    def app_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)


def demo_config(port: int) -> dict[str, Any]:
    config = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["router"]["max_body_bytes"] = MAX_BODY
    return config


def wait_ready(url: str, timeout_s: float = 420.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/v1/models", timeout=10)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(2)
    raise RuntimeError(f"the demo application did not become ready: {last}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, standin_cache: Path) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PRODUCT_SEGMENTOR_CACHE": str(standin_cache),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    dashboard_port, http_port = _free_port(), _free_port()
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--num-cpus",
            "4",
            "--num-gpus",
            "0",
            "--port",
            str(_free_port()),
            "--dashboard-port",
            str(dashboard_port),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    config = demo_config(http_port)
    handle = Cluster(
        url=f"http://127.0.0.1:{http_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        config=config,
        workdir=workdir,
        env=env,
    )
    try:
        handle.deploy(config)
        wait_ready(handle.url)
        yield handle
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="session")
def client(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        yield http
