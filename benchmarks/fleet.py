"""Several load-generator processes at once, so the load generator is never the bound.

One Python process driving HTTP tops out near 1,000 small frames/s (its interpreter is then
busy all the time: ``client_cpu_per_wall_s`` near 1.0). :func:`run_fleet` starts
``processes`` copies of ``benchmarks.load_test``, each with its own event loop and its own
HTTP (or gRPC) clients, gives each its share of the clients, and merges what they measured:
frames/s summed, latency percentiles over every request of every process, and the CPU the
whole fleet used (``os.times`` of the waited children), so a report always says whether the
load generator or the service was the bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.frames import frame_set, write_frames
from benchmarks.load_test import answers_rle, finds_objects
from tests.conftest import REPO_ROOT

#: A process busier than this (CPU seconds per wall second) was the bound, not the service.
SATURATED = 0.9


def run_fleet(
    urls: list[str],
    endpoint: str,
    *,
    processes: int,
    clients: int,
    duration_s: float,
    frames_per_request: int = 1,
    width: int = 1920,
    height: int = 1080,
    transport: str = "http",
    frames: str = "plain",
) -> dict[str, Any]:
    """``clients`` concurrent requests from ``processes`` processes for ``duration_s``, with
    frames of the source ``frames`` (``benchmarks.frames``), rendered once here."""
    per_process = max(1, clients // processes)
    frame_source = frame_set(frames, width, height)
    with tempfile.TemporaryDirectory() as tmp:
        frames_dir = Path(tmp) / "frames"
        write_frames(frame_source, frames_dir)
        gt = frame_source.mean_objects
        outs = [Path(tmp) / f"load-{i}.json" for i in range(processes)]
        running = []
        before = os.times()
        wall_started = time.monotonic()
        for index, out in enumerate(outs):
            # Each process starts on a different URL, so a few processes still cover them all.
            shifted = urls[index % len(urls) :] + urls[: index % len(urls)]
            command = [
                sys.executable,
                "-m",
                "benchmarks.load_test",
                *(arg for url in shifted for arg in ("--url", url)),
                "--transport",
                transport,
                "--endpoint",
                endpoint,
                "--concurrency",
                str(per_process),
                "--duration",
                str(duration_s),
                "--frames-per-request",
                str(frames_per_request),
                "--width",
                str(width),
                "--height",
                str(height),
                "--frames",
                frames,
                "--frames-dir",
                str(frames_dir),
                *(["--gt-objects-per-frame", str(gt)] if gt is not None else []),
                "--no-listing",
                "--keep-latencies",
                "--out",
                str(out),
            ]
            running.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errors = [process.communicate()[1] for process in running]
        wall = time.monotonic() - wall_started
        after = os.times()
        results = [json.loads(out.read_text()) for out in outs if out.exists()]
    if not results:
        reasons = sorted({e.strip().splitlines()[-1] for e in errors if e.strip()})
        return {"endpoint": endpoint, "transport": transport, "skipped": "; ".join(reasons)}
    latencies = [ms for r in results for ms in r.pop("latencies_ms")]
    windows = [r.pop("window") for r in results]
    frames_ok = sum(r["frames_ok"] for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    cpu_s = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    per_process_cpu = [r["client_cpu_per_wall_s"] for r in results]
    return {
        "endpoint": endpoint,
        "transport": transport,
        "urls": len(urls),
        "load_processes": processes,
        "clients": per_process * processes,
        "frames_per_request": frames_per_request,
        "frame_size": [width, height],
        **frame_source.describe(),
        "frames_ok": frames_ok,
        "frames_per_s": round(sum(r["frames_per_s"] for r in results), 2),
        "steady_frames_per_s": round(sum(r["steady_frames_per_s"] for r in results), 2),
        # Per answered frame: instances found (products for ``products``), RLE and answer bytes.
        **{
            f"{key}_per_frame": round(sum(r[key] for r in results) / frames_ok, 2)
            if frames_ok and counted
            else None
            for key, counted in (
                ("instances", finds_objects(endpoint)),
                ("rle_bytes", answers_rle(endpoint)),
                ("body_bytes", True),
            )
        },
        "requests_sent": sum(r["requests_sent"] for r in results),
        "responses_received": sum(r["responses_received"] for r in results),
        "statuses": statuses,
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        },
        # Cores the whole load generator used while it ran (start-up, JPEG synthesis included)
        # and each process's own busy share of the measured window: near 1.0 it was the bound.
        "load_cpu_s": round(cpu_s, 1),
        "load_cpu_cores": round(cpu_s / max(1e-9, wall), 2),
        "load_cpu_per_process": per_process_cpu,
        "load_generator_saturated": any(c >= SATURATED for c in per_process_cpu),
        # From the first process's first request to the last one's last answer (one
        # monotonic clock for the host): the seconds the service was under this load.
        "load_span_s": round(
            max(w["ended"] for w in windows) - min(w["started"] for w in windows), 3
        ),
    }
