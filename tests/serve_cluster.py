"""Start a real Ray cluster and deploy a Serve config the way users do (``serve deploy``)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import REPO_ROOT

_CLI_MODULES = {"ray": "ray.scripts.scripts", "serve": "ray.serve.scripts"}


def _tool(name: str) -> list[str]:
    """The ``ray``/``serve`` command of this interpreter's Ray, run as a module so it works
    where Ray's console scripts are not installed (the GPU machine's carried packages)."""
    return [sys.executable, "-m", _CLI_MODULES[name]]


def free_port() -> int:
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
    metrics_url: str = ""

    def deploy(self, config: dict[str, Any], name: str = "config.yaml") -> None:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [*_tool("serve"), "deploy", str(path), "--address", self.dashboard],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=120,
        )

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [*_tool("serve"), "status", "--address", self.dashboard],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=60,
            text=True,
        ).stdout
        loaded: dict[str, Any] = yaml.safe_load(out)
        return loaded

    def app_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)

    def wait_ready(self, timeout_s: float = 420.0) -> None:
        self.wait_ready_at(self.url, timeout_s)

    def wait_ready_at(
        self, url: str, timeout_s: float = 420.0, headers: dict[str, str] | None = None
    ) -> None:
        """Wait until ``url``/v1/models answers 200 (every model is up); fail at once when a
        deploy failed."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{url}/v1/models", timeout=10, headers=headers)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = exc
            failed = [
                f"{name}: {app.get('message')}"
                for name, app in (self.status().get("applications") or {}).items()
                if app.get("status") == "DEPLOY_FAILED"
            ]
            if failed:
                raise RuntimeError(f"deploy failed: {failed}; {self.status()}")
            time.sleep(2)
        raise RuntimeError(f"the application did not become ready: {last}; {self.status()}")


def load_config(path: Path, port: int) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["http_options"]["port"] = port
    config["http_options"]["host"] = "127.0.0.1"
    return config


@contextmanager
def running_cluster(
    config_path: Path,
    workdir: Path,
    *,
    num_cpus: int = 4,
    num_gpus: int = 0,
    edit: Any = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """``ray start --head``, ``serve deploy`` of ``config_path`` (edited), ready to serve."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(extra_env or {}),
    }
    dashboard_port, http_port, metrics_port = free_port(), free_port(), free_port()
    subprocess.run(
        [
            *_tool("ray"),
            "start",
            "--head",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            str(num_gpus),
            "--port",
            str(free_port()),
            "--dashboard-port",
            str(dashboard_port),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            "--metrics-export-port",
            str(metrics_port),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    config = load_config(config_path, http_port)
    if edit is not None:
        edit(config)
    cluster = Cluster(
        url=f"http://127.0.0.1:{http_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        config=config,
        workdir=workdir,
        env=env,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    try:
        cluster.deploy(config)
        cluster.wait_ready()
        yield cluster
    finally:
        subprocess.run([*_tool("ray"), "stop", "--force"], env=env, capture_output=True)
