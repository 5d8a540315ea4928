"""Rollouts under load: what callers see while ``serve deploy`` changes the running application.

A steady load of single frames and ``/v1/frames`` requests runs through the project's client
(:class:`segmentation_client.SegmentorClient`, which retries 503/429 after ``Retry-After``)
while the application is deployed again with one change at a time:

- ``user-config``: RMBG-2.0's ``user_config`` (``max_batch_size`` halved): replicas are
  reconfigured in place, none is replaced;
- ``replicas``: ``ray_actor_options.num_cpus`` of both segmentors (90 %): every segmentor
  replica is replaced;
- ``router``: a Router argument (``router.max_frames_per_request`` one lower). Any change of
  the application's ``args`` changes its code version (Serve hashes ``import_path``,
  ``runtime_env`` and ``args``), so every deployment of the application is replaced, not only
  the Router;
- ``bad-model``: RMBG-2.0's model path set to a directory that does not exist: the new
  replicas fail to start, and the case then deploys the previous config again (the recovery).

Per case it reports the frames answered and the frames lost after the client's retries
(with why), every HTTP status the client received (503s it retried included), the 5xx that
reached the caller, the longest gap between two answers, the throughput before the deploy and
its lowest 2-second rate after it (the dip), the seconds until the new version served
everything (Serve's status back to RUNNING with no replica of the old version left), which
deployments had their replicas replaced, and, for ``bad-model``, whether the replicas of the
old version kept serving. JSON on stdout and in ``--out``.

On the demo application (CPU stand-ins), starting its own Ray cluster:

    python -m benchmarks.rollout_bench --start-cluster --config configs/demo.yaml \\
        --window-s 40 --out rollouts-demo.json

Against a running cluster (any config, e.g. the real models on GPUs; the config is deployed
first as the baseline, then each change):

    python -m benchmarks.rollout_bench --config serve_config.yaml \\
        --dashboard http://127.0.0.1:8265 --url http://127.0.0.1:8000 \\
        --api-key-env SEGMENTOR_API_KEY --frame-size 1920x1080 --out rollouts-gpu.json

Two Ray nodes on this machine (``--nodes 2``: a head and a worker with its own temp dir,
process group and proxy ports; ``--gpus 1`` gives each node its own card), one replica of
each deployment per node, and the ``node-loss`` case beside the rollouts: the worker node
killed under load (SIGKILL to its processes only), a node like it started again, counted
until Serve has put a replica of each deployment back on it:

    python -m benchmarks.rollout_bench --start-cluster --nodes 2 --gpus 1 --cpus 16 \
        --config configs/gpu-bench.yaml --frame-size 1920x1080 --out two-nodes-gpu.json

The cases run in order on one cluster, each from the config the previous one left deployed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.load_test import synthetic_jpeg
from segmentation_client import RetryPolicy, SegmentorClient
from segmentation_client.client import FrameError, Task
from tests.serve_cluster import (
    Cluster,
    WorkerNode,
    alive_nodes,
    node_cards,
    running_cluster,
    start_worker,
)

CASES = ("user-config", "replicas", "router", "bad-model", "node-loss")
#: What runs without ``--nodes``: ``node-loss`` needs a worker node this tool started.
ROLLOUTS = CASES[:4]
#: RMBG-2.0's model for ``bad-model``: a path no node has.
MISSING_MODEL = "/nonexistent/rollout-check/RMBG-2.0"


# -- load ---------------------------------------------------------------------------------
@dataclass
class Call:
    """One call of the load: when it ended, frames sent, frames answered, why any was lost."""

    ended: float
    frames: int
    answered: int
    error: str = ""


class FramesFailed(Exception):
    """A ``/v1/frames`` answer (200) in which some frames failed on their own."""

    def __init__(self, answered: int, errors: list[str]) -> None:
        super().__init__(f"{len(errors)} frames failed: {errors[:3]}")
        self.answered = answered
        self.errors = errors


def frames_call(client: SegmentorClient, frame: bytes, batch: int, task: Task) -> int:
    """One ``/v1/frames`` request of ``batch`` copies of ``frame`` (mask out): the frames
    answered, or :class:`FramesFailed` when some failed inside a 200 answer."""
    results = client.frames([frame] * batch, task=task, output="mask")
    errors = [f"{r.code}: {r.message}"[:200] for r in results if isinstance(r, FrameError)]
    if errors:  # answered 200, but these frames failed: lost, and why
        raise FramesFailed(batch - len(errors), errors)
    return len(results)


def attempt(call: Callable[[], int]) -> tuple[int, str]:
    """(frames answered, why any was lost: "" when none) of one call of the load."""
    try:
        return int(call()), ""
    except FramesFailed as exc:
        return exc.answered, f"frame errors: {sorted(set(exc.errors))}"[:300]
    except Exception as exc:  # every way a call fails is counted
        return 0, f"{type(exc).__name__}: {exc}"[:300]


class RecordingClient(SegmentorClient):
    """The project's client, noting the status and time of every HTTP answer it receives
    (answers it then retried included)."""

    def _open(self, limits: httpx.Limits) -> None:
        super()._open(limits)
        self.statuses: list[tuple[float, int]] = []
        self._noted = threading.Lock()
        self._http.event_hooks["response"].append(self._note)

    def _note(self, response: httpx.Response) -> None:
        with self._noted:
            self.statuses.append((time.monotonic(), response.status_code))


class Load:
    """``threads`` threads sending, in turn, a single frame to remove-background, a
    ``/v1/frames`` segment request of ``batch`` frames, a single frame to segment and a
    ``/v1/frames`` remove-background request, through one shared client."""

    def __init__(
        self,
        url: str,
        *,
        threads: int = 4,
        batch: int = 4,
        frame: bytes,
        api_key: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.client = RecordingClient(
            url,
            api_key=api_key,
            max_concurrency=threads,
            retry=RetryPolicy(attempts=1000, max_wait_s=2.0),
            timeout_s=timeout_s,
        )
        self.threads = threads
        self.batch = batch
        self.frame = frame
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def _kinds(self) -> list[tuple[int, Callable[[], int]]]:
        """(frames sent, call returning the frames answered) of each kind of request."""
        client, frame, batch = self.client, self.frame, self.batch

        def frames(task: Task) -> int:
            return frames_call(client, frame, batch, task)

        return [
            (1, lambda: len(client.remove_background(frame, output="mask").data) > 0),
            (batch, lambda: frames("segment")),
            (1, lambda: client.segment(frame).width > 0),
            (batch, lambda: frames("remove-background")),
        ]

    def _run(self, offset: int) -> None:
        kinds = self._kinds()
        turn = offset
        while not self._stop.is_set():
            sent, call = kinds[turn % len(kinds)]
            turn += 1
            answered, error = attempt(call)
            if answered < sent and not error:
                error = "frame errors in the answer"
            with self._lock:
                self.calls.append(Call(time.monotonic(), sent, answered, error))

    def __enter__(self) -> Load:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(index,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.client.timeout_s + 10)
        self.client.close()

    def between(self, start: float, end: float) -> tuple[list[Call], list[int]]:
        """Calls that ended and HTTP statuses received in ``[start, end)``."""
        with self._lock:
            calls = [c for c in self.calls if start <= c.ended < end]
        with self.client._noted:
            statuses = [s for t, s in self.client.statuses if start <= t < end]
        return calls, statuses


# -- what Serve says ------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The application as the controller's REST API gives it at one moment."""

    at: float
    status: str
    message: str
    deployed_at: float
    #: deployment -> (status, {replica_id: state})
    deployments: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)


def snapshot(dashboard: str, app: str) -> Snapshot | None:
    """The application ``app`` now, or None when the controller cannot be reached."""
    try:
        response = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    details = (response.json().get("applications") or {}).get(app)
    if details is None:
        return None
    deployments = {
        name: (
            str(d.get("status")),
            {str(r["replica_id"]): str(r["state"]) for r in d.get("replicas") or []},
        )
        for name, d in (details.get("deployments") or {}).items()
    }
    return Snapshot(
        at=time.monotonic(),
        status=str(details.get("status")),
        message=str(details.get("message") or ""),
        deployed_at=float(details.get("last_deployed_time_s") or 0.0),
        deployments=deployments,
    )


class Watcher:
    """Polls the controller every 0.5 s and notes each replica's state changes, so a gap in
    the answers can be set beside what Serve was doing."""

    def __init__(self, dashboard: str, app: str) -> None:
        self.dashboard, self.app = dashboard, app
        self.events: list[tuple[float, str, str, str]] = []
        self._states: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = snapshot(self.dashboard, self.app)
            # While the controller builds a new version of the application (build_app in a
            # task of its own) the REST API lists no deployments: nothing stopped then.
            if now is not None and now.deployments:
                seen = set()
                for name, (_, replicas) in now.deployments.items():
                    for replica, state in replicas.items():
                        seen.add((name, replica))
                        if self._states.get((name, replica)) != state:
                            self._states[(name, replica)] = state
                            self.events.append((now.at, name, replica[:8], state))
                for key in set(self._states) - seen:
                    del self._states[key]
                    self.events.append((now.at, key[0], key[1][:8], "GONE"))
            self._stop.wait(0.5)

    def between(self, start: float, end: float) -> list[str]:
        return [
            f"{t - start:6.1f}s {name} {replica} {state}"
            for t, name, replica, state in self.events
            if start <= t < end
        ]

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def converged(now: Snapshot, before: Snapshot) -> bool:
    """Serve serves the new version only: RUNNING, every replica RUNNING, and no replica of a
    deployment that was replaced left over (a replica id kept means it was reconfigured)."""
    if now.status != "RUNNING" or now.deployed_at <= before.deployed_at:
        return False
    for _, (status, replicas) in now.deployments.items():
        if status != "HEALTHY" or any(state != "RUNNING" for state in replicas.values()):
            return False
    return True


def wait_for(
    dashboard: str,
    app: str,
    before: Snapshot,
    done: Callable[[Snapshot], bool],
    timeout_s: float,
) -> Snapshot | None:
    """Poll the controller every 0.5 s until ``done``; the snapshot that satisfied it, or
    None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = snapshot(dashboard, app)
        if now is not None and now.deployed_at > before.deployed_at and done(now):
            return now
        time.sleep(0.5)
    return None


def failed(now: Snapshot) -> bool:
    return now.status == "DEPLOY_FAILED"


def replaced(before: Snapshot, after: Snapshot) -> dict[str, bool]:
    """Per deployment: none of the replicas running before is among those running after."""
    result = {}
    for name, (_, replicas) in after.deployments.items():
        old = set(before.deployments.get(name, ("", {}))[1])
        result[name] = not (old & set(replicas))
    return result


# -- the changes ----------------------------------------------------------------------------
def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    for deployment in app.get("deployments") or []:
        if deployment["name"] == name:
            return dict(deployment)
    raise KeyError(f"the config has no deployment {name!r}")


def edit(app: dict[str, Any], case: str) -> dict[str, Any]:
    """The application config ``app`` with the change of ``case``."""
    app = copy.deepcopy(app)
    if case == "user-config":
        rmbg = _deployment(app, "RMBGDeployment")
        user = dict(rmbg.get("user_config") or {})
        user["max_batch_size"] = max(1, int(user.get("max_batch_size", 8)) // 2)
        rmbg["user_config"] = user
        _put(app, rmbg)
    elif case == "replicas":
        for name in ("RMBGDeployment", "YoloDeployment"):
            deployment = _deployment(app, name)
            options = dict(deployment.get("ray_actor_options") or {})
            options["num_cpus"] = round(float(options.get("num_cpus", 1)) * 0.9, 3)
            deployment["ray_actor_options"] = options
            _put(app, deployment)
    elif case == "router":
        router = app.setdefault("args", {}).setdefault("router", {})
        inflight = int(router.get("max_inflight_frames", 1024))
        router["max_frames_per_request"] = (
            min(inflight, int(router.get("max_frames_per_request", 256))) - 1
        )
    elif case == "bad-model":
        app.setdefault("args", {}).setdefault("rmbg", {})["model"] = MISSING_MODEL
    else:
        raise ValueError(f"unknown case {case!r}: accepted are {', '.join(CASES)}")
    return app


def _put(app: dict[str, Any], deployment: dict[str, Any]) -> None:
    app["deployments"] = [
        deployment if d["name"] == deployment["name"] else d for d in app["deployments"]
    ]


def per_node(app: dict[str, Any], nodes: int) -> dict[str, Any]:
    """``app`` (edited in place) with one replica of each deployment per node: ``nodes``
    replicas, at most one on a node (``max_replicas_per_node: 1``). No surge then: a node holds
    no second replica, so a rollout replaces one node's replicas at a time while the other
    nodes serve (Serve's rolling update, 20 % of the replicas at a time, at least one)."""
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = nodes
        deployment["max_replicas_per_node"] = 1
        deployment["max_surge_percent"] = 0
    return app


def _replicas(dashboard: str, app: str) -> dict[str, Any] | None:
    response = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10)
    response.raise_for_status()
    details: dict[str, Any] | None = (response.json().get("applications") or {}).get(app)
    return details


def replica_nodes(dashboard: str, app: str) -> dict[str, list[str]]:
    """Per deployment of ``app``: the node of each RUNNING replica."""
    details = _replicas(dashboard, app) or {}
    return {
        name: sorted(
            str(r["node_id"]) for r in d.get("replicas") or [] if r.get("state") == "RUNNING"
        )
        for name, d in (details.get("deployments") or {}).items()
    }


def restored(dashboard: str, app: str, node_ids: set[str]) -> bool:
    """``app`` RUNNING with every deployment HEALTHY and exactly one RUNNING replica on each
    of ``node_ids``."""
    try:
        details = _replicas(dashboard, app)
    except httpx.HTTPError:
        return False
    if details is None or details.get("status") != "RUNNING":
        return False
    wanted = sorted(node_ids)
    return all(
        d.get("status") == "HEALTHY"
        and sorted(
            str(r["node_id"]) for r in d.get("replicas") or [] if r.get("state") == "RUNNING"
        )
        == wanted
        for d in (details.get("deployments") or {}).values()
    )


# -- one case -------------------------------------------------------------------------------
def longest_gap(calls: list[Call], start: float, end: float) -> tuple[float, float]:
    """Longest time in ``[start, end]`` without an answer that brought frames back, and when
    it began (seconds after ``start``)."""
    times = sorted(c.ended for c in calls if c.answered)
    edges = [start, *times, end]
    length, began = max((b - a, a) for a, b in itertools.pairwise(edges))
    return length, began - start


def lowest_rate(calls: list[Call], start: float, end: float, width_s: float = 2.0) -> float:
    """Lowest frames/s answered over any ``width_s`` window in ``[start, end]`` (0.5 s steps)."""
    lowest = float("inf")
    left = start
    while left + width_s <= end:
        frames = sum(c.answered for c in calls if left <= c.ended < left + width_s)
        lowest = min(lowest, frames / width_s)
        left += 0.5
    return 0.0 if lowest == float("inf") else lowest


def counts(load: Load, start: float, end: float, baseline_fps: float) -> dict[str, Any]:
    calls, statuses = load.between(start, end)
    lost = [c for c in calls if c.answered < c.frames]
    reasons = Counter(c.error for c in lost)
    reached_5xx = [c.error for c in lost if c.error.startswith("ServiceError: 5")]
    low = lowest_rate(calls, start, end)
    gap, gap_at = longest_gap(calls, start, end)
    return {
        "seconds": round(end - start, 1),
        "frames_sent": sum(c.frames for c in calls),
        "frames_answered": sum(c.answered for c in calls),
        "frames_lost": sum(c.frames - c.answered for c in lost),
        "lost_because": dict(reasons.most_common(5)),
        "statuses": {str(k): v for k, v in sorted(Counter(statuses).items())},
        "answers_5xx": sum(1 for s in statuses if s >= 500),
        "calls_5xx_reaching_caller": len(reached_5xx),
        "longest_gap_s": round(gap, 2),
        "longest_gap_began_s": round(gap_at, 1),
        "frames_per_s": round(sum(c.answered for c in calls) / max(1e-9, end - start), 1),
        "lowest_2s_frames_per_s": round(low, 1),
        "dip_pct": round(100 * (1 - low / baseline_fps), 1) if baseline_fps else None,
    }


def run_case(
    cluster: Cluster,
    load: Load,
    base: dict[str, Any],
    app_index: int,
    case: str,
    *,
    window_s: float,
    baseline_s: float,
    converge_timeout_s: float,
    watcher: Watcher | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Deploy ``case``'s change of ``base`` under ``load``; its counts, and the config left
    deployed (``base`` again after ``bad-model``, which is rolled back)."""
    app_name = base["applications"][app_index]["name"]
    changed = copy.deepcopy(base)
    changed["applications"][app_index] = edit(base["applications"][app_index], case)
    before = snapshot(cluster.dashboard, app_name)
    if before is None:
        raise RuntimeError(f"application {app_name!r} not found at {cluster.dashboard}")
    start = time.monotonic()
    time.sleep(baseline_s)
    baseline_calls, _ = load.between(start, time.monotonic())
    baseline_fps = sum(c.answered for c in baseline_calls) / baseline_s
    deployed = time.monotonic()
    cluster.deploy(changed, f"{case}.yaml")
    result: dict[str, Any] = {"case": case, "baseline_frames_per_s": round(baseline_fps, 1)}
    if case == "bad-model":
        end_state = wait_for(cluster.dashboard, app_name, before, failed, converge_timeout_s)
        result["deploy_failed_s"] = _since(deployed, end_state)
        result["message"] = _failure_message(end_state)
        serving = snapshot(cluster.dashboard, app_name)
        _sleep_until(deployed + window_s)
        # The old RMBG-2.0 replicas must still be the ones serving.
        if serving is not None:
            old = set(before.deployments.get("RMBGDeployment", ("", {}))[1])
            now = serving.deployments.get("RMBGDeployment", ("", {}))[1]
            running = {r for r, s in now.items() if s == "RUNNING"}
            # All of them (one replica, surge), or those the rolling update had not reached
            # yet when the new version failed (N >= 2 replicas without surge).
            result["old_rmbg_replicas_kept"] = bool(old) and old <= running
            result["old_rmbg_replicas_running"] = [len(old & running), len(old)]
        failed_at = snapshot(cluster.dashboard, app_name) or before
        rollback = time.monotonic()
        cluster.deploy(base, f"{case}-rollback.yaml")
        after = wait_for(
            cluster.dashboard,
            app_name,
            failed_at,
            lambda s: converged(s, failed_at),
            converge_timeout_s,
        )
        result["rollback_converged_s"] = _since(rollback, after)
        _sleep_until(max(time.monotonic() + 2, rollback + window_s / 2))
        left = base
    else:
        after = wait_for(
            cluster.dashboard, app_name, before, lambda s: converged(s, before), converge_timeout_s
        )
        result["converged_s"] = _since(deployed, after)
        _sleep_until(max(deployed + window_s, time.monotonic() + 2))
        left = changed
    if after is not None:
        result["replaced"] = replaced(before, after)
    result.update(counts(load, deployed, time.monotonic(), baseline_fps))
    if watcher is not None:
        result["replica_events"] = watcher.between(deployed, time.monotonic())
    return result, left


def run_node_loss(
    cluster: Cluster,
    load: Load,
    app_name: str,
    worker: WorkerNode,
    *,
    window_s: float,
    baseline_s: float,
    converge_timeout_s: float,
) -> tuple[dict[str, Any], WorkerNode]:
    """SIGKILL ``worker`` (every process of that node) under ``load``, let the other nodes
    serve alone for half the window, start a worker node like it again and wait until Serve
    has put a replica of each deployment back on it; its counts and the new worker."""
    nodes = alive_nodes(cluster.dashboard)
    others = {n["node_id"] for n in nodes if n["node_id"] != worker.node_id}
    start = time.monotonic()
    time.sleep(baseline_s)
    baseline_calls, _ = load.between(start, time.monotonic())
    baseline_fps = sum(c.answered for c in baseline_calls) / baseline_s
    killed = time.monotonic()
    worker.kill()
    _sleep_until(killed + window_s / 2)
    alone = counts(load, killed, time.monotonic(), baseline_fps)
    rejoined = time.monotonic()
    new = start_worker(cluster, **worker.options)
    joined = time.monotonic()
    worker.stop()
    deadline = time.monotonic() + converge_timeout_s
    back: float | None = None
    while time.monotonic() < deadline:
        if restored(cluster.dashboard, app_name, others | {new.node_id}):
            back = time.monotonic()
            break
        time.sleep(0.5)
    _sleep_until(max(killed + window_s, time.monotonic() + 2))
    result: dict[str, Any] = {
        "case": "node-loss",
        "baseline_frames_per_s": round(baseline_fps, 1),
        "other_nodes_alone": {
            k: alone[k] for k in ("seconds", "frames_answered", "frames_lost", "longest_gap_s")
        },
        "node_back_s": round(joined - rejoined, 1),
        "replicas_restored_s": None if back is None else round(back - rejoined, 1),
    }
    result.update(counts(load, killed, time.monotonic(), baseline_fps))
    return result, new


def _since(start: float, state: Snapshot | None) -> float | None:
    return None if state is None else round(state.at - start, 1)


def _failure_message(state: Snapshot | None) -> str:
    if state is None:
        return ""
    messages = [state.message] + [
        f"{name}: {status}" for name, (status, _) in state.deployments.items()
    ]
    return "; ".join(m for m in messages if m)[:2000]


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


def run(
    cluster: Cluster,
    base: dict[str, Any],
    *,
    cases: list[str],
    app_index: int = 0,
    window_s: float = 40.0,
    baseline_s: float = 8.0,
    threads: int = 4,
    batch: int = 4,
    frame_size: tuple[int, int] = (640, 360),
    api_key: str | None = None,
    client_timeout_s: float = 60.0,
    converge_timeout_s: float = 600.0,
    url: str | None = None,
    workers: list[WorkerNode] | None = None,
) -> dict[str, Any]:
    """Deploy ``base`` (wait until it serves), then each of ``cases`` under load; the report.
    ``node-loss`` kills the first of ``workers`` (and puts the new one in its place)."""
    app = base["applications"][app_index]
    prefix = app.get("route_prefix") or "/"
    target = (url or cluster.url).rstrip("/") + ("" if prefix == "/" else prefix)
    app_name = app["name"]
    before = snapshot(cluster.dashboard, app_name)
    cluster.deploy(base, "baseline.yaml")
    if before is not None:  # a config already running: wait until the baseline is installed
        wait_for(
            cluster.dashboard, app_name, before, lambda s: converged(s, before), converge_timeout_s
        )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    cluster.wait_ready_at(target, converge_timeout_s, headers=headers)
    frame = synthetic_jpeg(*frame_size)
    report: dict[str, Any] = {
        "threads": threads,
        "frames_per_request": batch,
        "frame_size": list(frame_size),
        "window_s": window_s,
        "client_timeout_s": client_timeout_s,
        "cases": [],
    }
    with (
        Load(
            target,
            threads=threads,
            batch=batch,
            frame=frame,
            api_key=api_key,
            timeout_s=client_timeout_s,
        ) as load,
        Watcher(cluster.dashboard, app_name) as watcher,
    ):
        current = base
        for case in cases:
            if case == "node-loss":
                if not workers:
                    raise ValueError("node-loss needs a worker node started by this tool")
                result, workers[0] = run_node_loss(
                    cluster,
                    load,
                    app_name,
                    workers[0],
                    window_s=window_s,
                    baseline_s=baseline_s,
                    converge_timeout_s=converge_timeout_s,
                )
                report["cases"].append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
                continue
            result, current = run_case(
                cluster,
                load,
                current,
                app_index,
                case,
                window_s=window_s,
                baseline_s=baseline_s,
                converge_timeout_s=converge_timeout_s,
                watcher=watcher,
            )
            report["cases"].append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
        report["client_retries"] = load.client.retries
    return report


@contextmanager
def _cluster(
    args: argparse.Namespace, base: dict[str, Any]
) -> Iterator[tuple[Cluster, list[WorkerNode]]]:
    """The cluster to measure, and the worker nodes this tool started on it (``--nodes``:
    each its own process group and temp dir; with ``--gpus`` each node gets its own cards
    through ``CUDA_VISIBLE_DEVICES``)."""
    with tempfile.TemporaryDirectory(prefix="rollout-") as tmp:
        if not args.start_cluster:
            if not args.dashboard or not args.url:
                raise SystemExit("--dashboard and --url are needed without --start-cluster")
            cluster = Cluster(
                url=args.url,
                dashboard=args.dashboard,
                config=base,
                workdir=Path(tmp),
                env=dict(os.environ),
            )
            yield cluster, []
            return

        def cards(node: int) -> dict[str, str]:
            return node_cards(node, args.gpus) if args.gpus and args.nodes > 1 else {}

        with running_cluster(
            Path(args.config),
            Path(tmp),
            num_cpus=args.cpus,
            num_gpus=args.gpus,
            extra_env=cards(0),
        ) as cluster:
            workers: list[WorkerNode] = []
            try:
                for node in range(1, args.nodes):
                    workers.append(
                        start_worker(
                            cluster, num_cpus=args.cpus, num_gpus=args.gpus, extra_env=cards(node)
                        )
                    )
                yield cluster, workers
            finally:
                for worker in workers:
                    worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the Serve config to start from")
    parser.add_argument("--app", default=None, help="application name (default: the first)")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"of {', '.join(CASES)} (default: the rollouts, and node-loss with --nodes 2+)",
    )
    parser.add_argument("--window-s", type=float, default=40.0, help="seconds per change")
    parser.add_argument("--baseline-s", type=float, default=8.0, help="load before each deploy")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--frames-per-request", type=int, default=4)
    parser.add_argument("--frame-size", default="640x360", help="WxH of the JPEG sent")
    parser.add_argument("--client-timeout-s", type=float, default=60.0)
    parser.add_argument("--converge-timeout-s", type=float, default=600.0)
    parser.add_argument("--api-key-env", default=None, help="variable holding the API key")
    parser.add_argument("--start-cluster", action="store_true", help="start a local Ray cluster")
    parser.add_argument("--cpus", type=int, default=4, help="with --start-cluster")
    parser.add_argument("--gpus", type=int, default=0, help="per node, with --start-cluster")
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="with --start-cluster: Ray nodes on this machine (a head and workers, --cpus and "
        "--gpus each); the app gets one replica of each deployment per node",
    )
    parser.add_argument("--dashboard", default=None, help="e.g. http://127.0.0.1:8265")
    parser.add_argument("--url", default=None, help="the HTTP ingress, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    base: dict[str, Any] = yaml.safe_load(Path(args.config).read_text())
    default = [*ROLLOUTS, "node-loss"] if args.nodes > 1 else list(ROLLOUTS)
    cases = [c for c in args.cases.split(",") if c] if args.cases else default
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}: accepted are {', '.join(CASES)}")
    width, height = (int(v) for v in args.frame_size.split("x"))
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    with _cluster(args, base) as (cluster, workers):
        if args.start_cluster:
            base = cluster.app_config()  # with the ports the cluster was given
        names = [a["name"] for a in base["applications"]]
        app_index = names.index(args.app) if args.app else 0
        if args.nodes > 1:
            per_node(base["applications"][app_index], args.nodes)
        for model in (base["applications"][app_index].get("args") or {}).values():
            # A relative model path (configs/gpu-bench.yaml's third_party/rmbg20) is this
            # checkout's: replicas run elsewhere.
            source = model.get("model") if isinstance(model, dict) else None
            if isinstance(source, str) and source and Path(source).exists():
                model["model"] = str(Path(model["model"]).resolve())
        report = run(
            cluster,
            base,
            cases=cases,
            app_index=app_index,
            window_s=args.window_s,
            baseline_s=args.baseline_s,
            threads=args.threads,
            batch=args.frames_per_request,
            frame_size=(width, height),
            api_key=api_key,
            client_timeout_s=args.client_timeout_s,
            converge_timeout_s=args.converge_timeout_s,
            workers=workers,
        )
    report["command"] = "python -m benchmarks.rollout_bench " + " ".join(argv or sys.argv[1:])
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
