"""Start a real Ray cluster and deploy a Serve config the way users do (``serve deploy``)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    grpc_target: str = ""

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


def load_config(path: Path, port: int, grpc_port: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["http_options"]["port"] = port
    config["http_options"]["host"] = "127.0.0.1"
    if grpc_port is not None and "grpc_options" in config:
        config["grpc_options"]["port"] = grpc_port
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
    grpc_port = free_port()
    # Every port and the temp dir are this cluster's own, so it runs beside a developer's
    # `serve run` (or another test session) without touching it; a short path keeps Ray's
    # unix sockets under the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="ps-ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            *_tool("ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            str(num_gpus),
            "--temp-dir",
            temp_dir,
            "--port",
            str(free_port()),
            "--node-manager-port",
            str(free_port()),
            "--object-manager-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-port",
            str(dashboard_port),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(metrics_port),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped below, and only it
    )
    config = load_config(config_path, http_port, grpc_port)
    if edit is not None:
        edit(config)
    cluster = Cluster(
        url=f"http://127.0.0.1:{http_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        config=config,
        workdir=workdir,
        env=env,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        grpc_target=f"127.0.0.1:{grpc_port}",
    )
    try:
        _wait_for_dashboard(cluster.dashboard, head)
        cluster.deploy(config)
        cluster.wait_ready()
        yield cluster
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url: str, head: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            if httpx.get(f"{url}/api/version", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Ray dashboard at {url} did not come up in {timeout_s:.0f}s")


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    """SIGTERM to the process group this test started (Ray's head and every worker it
    spawned), SIGKILL after ``grace_s``: never ``ray stop``, which stops every Ray on the
    machine."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
