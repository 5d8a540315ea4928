"""CPU time of the service's processes during a measured window, by kind, and GPU busy time.

Ray names its worker processes after the actor they hold (``ray::ServeReplica:<app>:<name>``),
so on the machine that runs the cluster the CPU seconds each kind used during a window are
the difference of two samples of ``psutil``'s per-process times: the routers, each segmentor
deployment, Serve's proxies and HAProxy. Divided by the frames answered in the window they
give the CPU-ms per frame of each process boundary the frames cross. Replicas also report
``gpu_busy_s``, the seconds their GPU thread spent on batches; its difference over the
window's length is the busy fraction of each replica's GPU thread.

Every matching process of the machine is counted: run it where the benchmark's cluster is the
only Ray cluster (as on the GPU machines). The window is the load generator's whole run, its
start-up included, so busy fractions read low when that start-up is long.
"""

from __future__ import annotations

from typing import Any

import psutil

#: What a process's command line says about its kind (first match wins).
KINDS = (
    ("Router", "router"),
    ("RMBGDeployment", "rmbg"),
    ("YoloDeployment", "yolo"),
    ("ProxyActor", "proxy"),
    ("haproxy", "haproxy"),
)


def _kind(process: psutil.Process) -> str | None:
    try:
        text = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for marker, kind in KINDS:
        if marker in text:
            return kind
    return None


def sample() -> dict[int, tuple[str, float]]:
    """Every service process now: pid -> (kind, CPU seconds used so far)."""
    found: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter():
        kind = _kind(process)
        if kind is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found[process.pid] = (kind, times.user + times.system)
    return found


def _used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds used between the samples) of each process of the later
    sample; one that started in between counts from zero."""
    return {
        pid: (kind, max(0.0, now - before.get(pid, (kind, 0.0))[1]))
        for pid, (kind, now) in after.items()
    }


def cpu_ms_per_frame(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], frames: int
) -> dict[str, Any]:
    """CPU-ms per answered frame of each kind between two samples, and the processes seen."""
    seconds: dict[str, float] = {}
    processes: dict[str, int] = {}
    for kind, used in _used(before, after).values():
        seconds[kind] = seconds.get(kind, 0.0) + used
        processes[kind] = processes.get(kind, 0) + 1
    return {
        "cpu_ms_per_frame": {
            kind: round(total * 1000 / frames, 2) if frames else None
            for kind, total in sorted(seconds.items())
        },
        "processes": dict(sorted(processes.items())),
        "cpu_s": {kind: round(total, 2) for kind, total in sorted(seconds.items())},
    }


def cores(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], window_s: float
) -> dict[int, tuple[str, float]]:
    """pid -> (kind, cores it used over the window) of each process of the later sample."""
    return {
        pid: (kind, used / max(1e-9, window_s))
        for pid, (kind, used) in _used(before, after).items()
    }


def busiest_cores(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], window_s: float
) -> dict[str, float]:
    """The most cores one process of each kind used over the window: a Python process near
    one core (its interpreter) or a kind whose busiest process is far above its mean says
    where a run saturates."""
    busiest: dict[str, float] = {}
    for kind, used in cores(before, after, window_s).values():
        busiest[kind] = max(busiest.get(kind, 0.0), round(used, 2))
    return dict(sorted(busiest.items()))


def gpu_busy(
    before: dict[tuple[str, int], dict[str, Any]],
    after: dict[tuple[str, int], dict[str, Any]],
    window_s: float,
) -> dict[str, list[float]]:
    """Busy fraction of each replica's GPU thread over the window, by model."""
    busy: dict[str, list[float]] = {}
    for key, now in after.items():
        then = before.get(key)
        if then is None or now.get("gpu_busy_s") is None or then.get("gpu_busy_s") is None:
            continue
        fraction = (now["gpu_busy_s"] - then["gpu_busy_s"]) / max(1e-9, window_s)
        busy.setdefault(now["model"], []).append(round(fraction, 3))
    return busy
