"""Start a real Ray cluster and deploy a Serve config the way users do (``serve deploy``)."""

from __future__ import annotations

import contextlib
import copy
import json
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import REPO_ROOT

#: A directory to keep each cluster's Serve logs in when it stops (``serve/``: controller,
#: proxies, replicas; ``worker-*.err``: a replica's stderr, its tracebacks). The temp dirs go
#: with their clusters, and with them what says why one never became ready.
KEEP_LOGS_ENV = "SERVE_CLUSTER_KEEP_LOGS"

#: What ``serve deploy`` prints when the dashboard closed the connection without an answer.
_DROPPED = "Remote end closed connection without response"
_CLI_MODULES = {"ray": "ray.scripts.scripts", "serve": "ray.serve.scripts"}


def _tool(name: str) -> list[str]:
    """The ``ray``/``serve`` command of this interpreter's Ray, run as a module so it works
    where Ray's console scripts are not installed (the GPU machine's carried packages)."""
    return [sys.executable, "-m", _CLI_MODULES[name]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_args(num_cpus: int, num_gpus: int, temp_dir: str, metrics_port: int) -> list[str]:
    """``ray start`` arguments of every node: its resources, temp dir and ports of its own."""
    return [
        "--block",
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        str(num_gpus),
        "--temp-dir",
        temp_dir,
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(metrics_port),
        "--disable-usage-stats",
    ]


@dataclass
class Cluster:
    url: str
    dashboard: str
    config: dict[str, Any]
    workdir: Path
    env: dict[str, str]
    metrics_url: str = ""
    grpc_target: str = ""
    #: ``host:port`` of the head's GCS, the ``--address`` a worker node joins.
    gcs_address: str = ""

    def deploy(self, config: dict[str, Any], name: str = "config.yaml") -> None:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(config))
        for attempt in range(3):
            try:
                subprocess.run(
                    [*_tool("serve"), "deploy", str(path), "--address", self.dashboard],
                    check=True,
                    env=self.env,
                    capture_output=True,
                    timeout=120,
                )
                return
            except subprocess.CalledProcessError as exc:
                stderr = exc.stderr.decode(errors="replace")
                # A deploy is idempotent: send it again when the dashboard dropped the
                # connection (seen on a machine with a load average of 30), not otherwise.
                if attempt < 2 and _DROPPED in stderr:
                    time.sleep(5)
                    continue
                # The same exception, saying why: `serve deploy` prints the cause on stderr.
                exc.add_note(f"serve deploy: {stderr[-3000:]}")
                raise

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
    grpc_port, gcs_port = free_port(), free_port()
    # Every port and the temp dir are this cluster's own, so it runs beside a developer's
    # `serve run` (or another test session) without touching it; a short path keeps Ray's
    # unix sockets under the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="ps-ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            *_tool("ray"),
            "start",
            "--head",
            *_node_args(num_cpus, num_gpus, temp_dir, metrics_port),
            "--port",
            str(gcs_port),
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-port",
            str(dashboard_port),
            "--include-dashboard",
            "true",
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
        gcs_address=f"127.0.0.1:{gcs_port}",
    )
    try:
        _wait_for_dashboard(cluster.dashboard, head)
        cluster.deploy(config)
        cluster.wait_ready()
        yield cluster
    finally:
        stop_process_group(head)
        keep_logs(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def keep_logs(temp_dir: str, keep_in: str | None = None) -> Path | None:
    """Copy a stopped node's Serve logs (``serve/`` and ``worker-*.err``) from its Ray temp
    dir to ``keep_in`` (default: ``$SERVE_CLUSTER_KEEP_LOGS``; nothing when neither is set),
    under the temp dir's name; where they went."""
    keep_in = keep_in or os.environ.get(KEEP_LOGS_ENV)
    logs = Path(temp_dir) / "session_latest" / "logs"
    if not keep_in or not logs.is_dir():
        return None
    kept = Path(keep_in) / Path(temp_dir).name
    try:
        kept.mkdir(parents=True, exist_ok=True)
        if (logs / "serve").is_dir():
            shutil.copytree(logs / "serve", kept / "serve", dirs_exist_ok=True)
        for err in logs.glob("worker-*.err"):
            shutil.copy2(err, kept / err.name)
    except (OSError, shutil.Error) as exc:  # never in place of the error being torn down
        print(f"{KEEP_LOGS_ENV}: keeping {logs} failed: {exc}", file=sys.stderr)
    return kept


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


def node_cards(node: int, gpus_per_node: int) -> dict[str, str]:
    """The environment giving node ``node`` of this host its own ``gpus_per_node`` cards."""
    ids = range(node * gpus_per_node, (node + 1) * gpus_per_node)
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in ids)}


def alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    """The cluster's alive nodes as Ray's state API lists them (``node_id``, ``is_head_node``,
    ``resources_total``, ...)."""
    response = httpx.get(f"{dashboard}/api/v0/nodes", params={"limit": 1000}, timeout=30)
    response.raise_for_status()
    nodes: list[dict[str, Any]] = response.json()["data"]["result"]["result"]
    return [node for node in nodes if node.get("state") == "ALIVE"]


@dataclass
class WorkerNode:
    """A Ray worker node this process started (``ray start --address``), in a process group
    and temp dir of its own, so it can be stopped or killed alone."""

    process: subprocess.Popen[bytes]
    temp_dir: str
    node_id: str
    #: Its own Serve proxy (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``): HTTP and gRPC.
    url: str
    grpc_target: str
    #: The arguments of :func:`start_worker` that started it: the same again brings a node
    #: like it back (same proxy ports).
    options: dict[str, Any] = field(default_factory=dict)

    def kill(self) -> None:
        """The node dies at once, as a machine does: SIGKILL to its raylet and every process
        it started (the replicas on it included), nothing else."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        stop_process_group(self.process)
        keep_logs(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        Path(self.temp_dir + ".log").unlink(missing_ok=True)


def start_worker(cluster: Cluster, **options: Any) -> WorkerNode:
    """:func:`_start_worker_once`, again (up to three times) when the node timed out joining:
    ``ray start`` gives the raylet 30 s to register with the GCS, which a machine with a load
    average of 20 on 2 cores did not always meet."""
    for attempt in range(3):
        try:
            return _start_worker_once(cluster, **options)
        except RuntimeError as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _start_worker_once(
    cluster: Cluster,
    *,
    num_cpus: int = 2,
    num_gpus: int = 0,
    resources: dict[str, float] | None = None,
    http_port: int | None = None,
    grpc_port: int | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 180,
) -> WorkerNode:
    """``ray start --address`` of a worker node joining ``cluster`` (same machine, its own
    ports and temp dir); returns once the node is alive. Its Serve proxy listens on
    ``http_port``/``grpc_port`` (free ones by default): on one machine every node cannot take
    the head's, so the worker's are set by Serve's per-node knobs in its environment."""
    http_port = http_port or free_port()
    grpc_port = grpc_port or free_port()
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "resources": resources,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "extra_env": extra_env,
    }
    env = {
        **cluster.env,
        "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(http_port),
        "RAY_SERVE_WORKER_PROXY_GRPC_PORT": str(grpc_port),
        **(extra_env or {}),
    }
    known = {node["node_id"] for node in alive_nodes(cluster.dashboard)}
    temp_dir = tempfile.mkdtemp(prefix="ps-rayw-", dir="/tmp")
    command = [
        *_tool("ray"),
        "start",
        "--address",
        cluster.gcs_address,
        *_node_args(num_cpus, num_gpus, temp_dir, free_port()),
    ]
    if resources:
        command += ["--resources", json.dumps(resources)]
    log = Path(temp_dir + ".log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed or stopped alone
        )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                said = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start --address exited with {process.returncode}: {said}")
            new = [n for n in alive_nodes(cluster.dashboard) if n["node_id"] not in known]
            if new:
                return WorkerNode(
                    process=process,
                    temp_dir=temp_dir,
                    node_id=str(new[0]["node_id"]),
                    url=f"http://127.0.0.1:{http_port}",
                    grpc_target=f"127.0.0.1:{grpc_port}",
                    options=options,
                )
            time.sleep(1)
        raise RuntimeError(f"the worker node did not join within {timeout_s:.0f}s")
    except BaseException:
        stop_process_group(process)
        keep_logs(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
        raise


@contextmanager
def worker_node(cluster: Cluster, **options: Any) -> Iterator[WorkerNode]:
    """:func:`start_worker`, stopped (its process group only) on the way out."""
    node = start_worker(cluster, **options)
    try:
        yield node
    finally:
        node.stop()
