"""Autoscaling seen live: a load that ramps up and back down, and the RMBG-2.0 replicas Serve
runs for it, over time.

One Ray cluster with ``--gpus`` cards; RMBG-2.0 autoscales between 1 and ``--gpus`` replicas
on the project's frame-based policy (``segmentation_service.autoscaling``), YOLO runs one
replica, the Routers a fixed number. The load is ``/v1/frames`` remove-background requests of
``--batch`` frames (mask out) through the project's client, which retries 503 after
``Retry-After``; ``--levels`` gives the client threads and seconds of each step. Reported per
``--window-s`` window: client threads, RMBG-2.0 replicas running (and starting), frames/s,
p50/p99 of the calls that ended in it, retried 503s; per replica, the seconds from first seen
(starting) to running; and the frames lost after the client's retries (the target is 0).

On four H100s (the published RMBG-2.0 code in third_party/rmbg20, random weights):

    python -m benchmarks.autoscale_bench --gpus 4 --levels 1:40,4:40,16:90,4:60,1:60 \\
        --out autoscale.json

On a CPU, the demo application (a smoke test: stand-ins, small frames):

    python -m benchmarks.autoscale_bench --config configs/demo.yaml --no-gpu --gpus 2 \\
        --frame-size 320x240 --levels 1:10,6:30,1:30 --out autoscale-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.ingress import PACK_SCHEDULING, ingress_env
from benchmarks.load_test import synthetic_jpeg
from benchmarks.rollout_bench import RecordingClient, attempt, frames_call, snapshot
from benchmarks.scaling_bench import GPU_SHARE
from segmentation_client import RetryPolicy
from tests.conftest import REPO_ROOT
from tests.serve_cluster import running_cluster

APP = "product-segmentor"
RMBG = "RMBGDeployment"


@dataclass
class Call:
    started: float
    ended: float
    frames: int
    answered: int
    error: str = ""


def autoscaling_config(
    config: dict[str, Any],
    gpus: int,
    routers: int,
    rmbg_dir: str,
    on_gpus: bool,
    up_delay_s: float,
    down_delay_s: float,
) -> None:
    """RMBG-2.0 autoscaled from 1 to ``gpus`` replicas, YOLO one replica, fixed Routers."""
    app = config["applications"][0]
    if rmbg_dir and on_gpus and "rmbg" in app["args"]:
        app["args"]["rmbg"]["model"] = str(Path(rmbg_dir).resolve())
    for deployment in app["deployments"]:
        name = deployment["name"]
        if on_gpus and name in GPU_SHARE:
            deployment.setdefault("ray_actor_options", {})["num_gpus"] = GPU_SHARE[name]
        if name == RMBG:
            deployment.pop("num_replicas", None)
            deployment["autoscaling_config"] = {
                "min_replicas": 1,
                "initial_replicas": 1,
                "max_replicas": gpus,
                "upscale_delay_s": up_delay_s,
                "downscale_delay_s": down_delay_s,
                "look_back_period_s": 5,
                "metrics_interval_s": 1,
                "policy": {
                    "policy_function": "segmentation_service.autoscaling:FramesPerReplicaPolicy",
                    "policy_kwargs": {"target_frames_per_replica": 32},
                },
                "target_ongoing_requests": 2,
            }
        else:
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = routers if name == "Router" else 1


class Ramp:
    """Client threads added and removed in steps, every call recorded."""

    def __init__(self, url: str, frame: bytes, batch: int, timeout_s: float) -> None:
        self.client = RecordingClient(
            url,
            max_concurrency=256,
            retry=RetryPolicy(attempts=1000, max_wait_s=2.0),
            timeout_s=timeout_s,
        )
        self.frame, self.batch = frame, batch
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stops: list[threading.Event] = []
        self._threads: list[threading.Thread] = []

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            answered, error = attempt(
                lambda: frames_call(self.client, self.frame, self.batch, "remove-background")
            )
            with self._lock:
                self.calls.append(Call(started, time.monotonic(), self.batch, answered, error))

    def set_threads(self, count: int) -> None:
        while len(self._stops) < count:
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
            self._stops.append(stop)
            self._threads.append(thread)
            thread.start()
        while len(self._stops) > count:  # a stopped thread finishes the call it is in
            self._stops.pop().set()
            self._threads.pop()

    def close(self) -> None:
        self.set_threads(0)
        time.sleep(0.1)
        self.client.close()


class ReplicaWatch:
    """RMBG-2.0's replicas by state, polled from the controller every ``every_s``."""

    def __init__(self, dashboard: str, every_s: float = 1.0) -> None:
        self.dashboard, self.every_s = dashboard, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.first_seen: dict[str, float] = {}
        self.running_at: dict[str, float] = {}
        self.gone_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = snapshot(self.dashboard, APP)
            if now is not None and RMBG in now.deployments:
                states = now.deployments[RMBG][1]
                counts: dict[str, int] = {}
                for replica, state in states.items():
                    counts[state] = counts.get(state, 0) + 1
                    self.first_seen.setdefault(replica, now.at)
                    if state == "RUNNING":
                        self.running_at.setdefault(replica, now.at)
                for replica in self.first_seen:
                    if states.get(replica, "STOPPED") == "STOPPED":
                        self.gone_at.setdefault(replica, now.at)
                self.samples.append((now.at, counts))
            self._stop.wait(self.every_s)

    def __enter__(self) -> ReplicaWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def timeline(
    ramp: Ramp,
    watch: ReplicaWatch,
    levels: list[tuple[float, int]],
    start: float,
    end: float,
    window_s: float,
) -> list[dict[str, Any]]:
    rows = []
    statuses = list(ramp.client.statuses)
    at = start
    while end - at >= window_s / 2:  # a last sliver of a window would give no rate
        stop = min(end, at + window_s)
        calls = [c for c in ramp.calls if at <= c.ended < stop]
        latencies = sorted(c.ended - c.started for c in calls if not c.error)
        seen = [counts for t, counts in watch.samples if at <= t < stop]
        middle = (at + stop) / 2
        threads = next((n for t, n in reversed(levels) if t <= middle), 0)
        rows.append(
            {
                "t_s": round(at - start, 1),
                "threads": threads,
                "rmbg_running": max((s.get("RUNNING", 0) for s in seen), default=None),
                "rmbg_starting": max((s.get("STARTING", 0) for s in seen), default=None),
                "frames_per_s": round(sum(c.answered for c in calls) / (stop - at), 1),
                "p50_ms": round(1000 * statistics.median(latencies)) if latencies else None,
                "p99_ms": (
                    round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])
                    if latencies
                    else None
                ),
                "retried_503": sum(1 for t, s in statuses if at <= t < stop and s == 503),
                "lost_frames": sum(c.frames - c.answered for c in calls),
            }
        )
        at = stop
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "gpu-bench.yaml"))
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--gpus", type=int, default=4, help="cards, and RMBG-2.0's max_replicas")
    parser.add_argument("--no-gpu", action="store_true", help="CPU smoke test (stand-ins)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--routers", type=int, default=4)
    parser.add_argument("--ingress", default="haproxy-throughput")
    parser.add_argument("--levels", default="1:40,4:40,16:90,4:60,1:60", help="threads:seconds")
    parser.add_argument("--batch", type=int, default=16, help="frames per /v1/frames call")
    parser.add_argument("--frame-size", default="1920x1080")
    parser.add_argument("--up-delay-s", type=float, default=5.0)
    parser.add_argument("--down-delay-s", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="the client's per call")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    width, height = (int(v) for v in args.frame_size.split("x"))
    steps = [(int(n), float(s)) for n, s in (level.split(":") for level in args.levels.split(","))]
    frame = synthetic_jpeg(width, height)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.autoscale_bench " + " ".join(argv or sys.argv[1:]),
        "levels": steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        env = {**PACK_SCHEDULING, **ingress_env(args.ingress, Path(tmp))}
        with running_cluster(
            Path(args.config),
            Path(tmp),
            num_cpus=args.cpus,
            num_gpus=0 if args.no_gpu else args.gpus,
            extra_env=env,
            edit=lambda c: autoscaling_config(
                c,
                args.gpus,
                args.routers,
                args.rmbg_dir,
                not args.no_gpu,
                args.up_delay_s,
                args.down_delay_s,
            ),
        ) as cluster:
            ramp = Ramp(cluster.url, frame, args.batch, args.timeout_s)
            with ReplicaWatch(cluster.dashboard) as watch:
                start = time.monotonic()
                levels: list[tuple[float, int]] = []
                try:
                    for threads, seconds in steps:
                        levels.append((time.monotonic(), threads))
                        ramp.set_threads(threads)
                        print(
                            json.dumps(
                                {"t_s": round(time.monotonic() - start), "threads": threads}
                            ),
                            flush=True,
                        )
                        time.sleep(seconds)
                finally:
                    ramp.close()
                end = time.monotonic()
            rows = timeline(ramp, watch, levels, start, end, args.window_s)
            for row in rows:
                print(json.dumps(row), flush=True)
            lost = [c for c in ramp.calls if c.error or c.answered < c.frames]
            report.update(
                timeline=rows,
                frames_answered=sum(c.answered for c in ramp.calls),
                frames_lost_after_retries=sum(c.frames - c.answered for c in lost),
                why_lost=sorted({c.error for c in lost})[:10],
                statuses={
                    str(s): sum(1 for _, x in ramp.client.statuses if x == s)
                    for s in sorted({x for _, x in ramp.client.statuses})
                },
                most_rmbg_replicas=max(
                    (c.get("RUNNING", 0) for _, c in watch.samples), default=None
                ),
                replica_start_s={
                    replica[-8:]: round(watch.running_at[replica] - seen, 1)
                    for replica, seen in watch.first_seen.items()
                    if replica in watch.running_at and seen > start + 1
                },
                replicas_stopped=len(watch.gone_at),
            )
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    brief = {k: v for k, v in report.items() if k != "timeline"}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
