"""Multi-GPU scaling: the same app and load at 1, 2, 4... GPUs of one host, side by side.

For each N, starts a Ray cluster with N GPUs, deploys ``--config`` with N replicas of each
segmentor (or an autoscaling range 1..N with ``--autoscale``), ``--routers-per-gpu`` routers
per GPU, then drives the saturating scenarios with ``--client-processes`` load generators per
GPU (one Python process tops out near 1,000 small frames/s). Records frames/s, the scaling
ratio against N=1, each replica's GPU (uuid) and where time goes (replica stage timings).

    NCCL_NVLS_ENABLE=0 python -m benchmarks.scaling_bench --gpus 1,2 --out scaling.json

RMBG-2.0 asks for 0.6 GPU per replica so that no two share a card (two at 0.5 would be
packed together); its memory is still held to half a card by ``gpu_memory_fraction``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import REPO_ROOT
from tests.serve_cluster import running_cluster

SCENARIOS = {
    # name: (endpoint, clients per GPU, frames per request, frame width, height)
    "rmbg": ("remove-background", 64, 1, 1920, 1080),
    "yolo-frames": ("frames-segment", 32, 16, 1920, 1080),
}


def scale_config(
    config: dict[str, Any], gpus: int, routers_per_gpu: int, autoscale: bool, rmbg_dir: str
) -> None:
    """N segmentor replicas (or autoscaling 1..N) and routers in proportion to the GPUs."""
    app = config["applications"][0]
    if "rmbg" in app["args"] and rmbg_dir:
        app["args"]["rmbg"]["model"] = str(Path(rmbg_dir).resolve())
    for deployment in app["deployments"]:
        if deployment["name"] == "Router":
            deployment["num_replicas"] = max(1, routers_per_gpu * max(1, gpus))
            continue
        if gpus and deployment["name"] == "RMBGDeployment":
            deployment["ray_actor_options"]["num_gpus"] = 0.6
            app["args"]["rmbg"]["gpu_memory_fraction"] = 0.5
        if autoscale:
            deployment.pop("num_replicas", None)
            deployment["autoscaling_config"] = {
                "min_replicas": 1,
                "max_replicas": max(1, gpus),
                "target_ongoing_requests": deployment.get("max_ongoing_requests", 64) // 2,
            }
        else:
            deployment["num_replicas"] = max(1, gpus)


def placement(url: str, samples: int = 40) -> list[dict[str, Any]]:
    """Each segmentor replica seen by ``/v1/models`` (calls are routed at random): pid, GPU."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for _ in range(samples):
        for model in httpx.get(f"{url}/v1/models", timeout=60).json()["models"]:
            seen[(model["name"], model["pid"])] = {
                "model": model["name"],
                "pid": model["pid"],
                "gpu_uuid": (model.get("gpu") or {}).get("uuid"),
                "stages": model.get("stages"),
                "largest_batch": model["batch"]["largest_batch"],
            }
    return sorted(seen.values(), key=lambda r: (r["model"], r["pid"]))


def drive(
    url: str,
    scenario: str,
    gpus: int,
    processes: int,
    duration: float,
    frame_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``processes`` load generators at once; frames/s summed over them."""
    endpoint, clients, frames, width, height = SCENARIOS[scenario]
    if frame_size:
        width, height = frame_size
    total_clients = clients * max(1, gpus)
    per_process = max(1, total_clients // processes)
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"load-{i}.json" for i in range(processes)]
        command = [
            sys.executable,
            "-m",
            "benchmarks.load_test",
            "--url",
            url,
            "--endpoint",
            endpoint,
            "--concurrency",
            str(per_process),
            "--duration",
            str(duration),
            "--frames-per-request",
            str(frames),
            "--width",
            str(width),
            "--height",
            str(height),
        ]
        running = [
            subprocess.Popen(
                [*command, "--out", str(out)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL
            )
            for out in outs
        ]
        for process in running:
            process.wait()
        results = [json.loads(out.read_text()) for out in outs if out.exists()]
    return {
        "scenario": scenario,
        "load_processes": processes,
        "clients": per_process * processes,
        "frames_per_s": round(sum(r["frames_per_s"] for r in results), 2),
        "steady_frames_per_s": round(sum(r["steady_frames_per_s"] for r in results), 2),
        "statuses": [r["statuses"] for r in results],
        "p99_ms": max((r["latency_ms"]["p99"] for r in results), default=None),
        "client_cpu_per_wall_s": [r["client_cpu_per_wall_s"] for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "gpu-bench.yaml"))
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, e.g. 1,2,4")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--routers-per-gpu", type=int, default=8)
    parser.add_argument("--client-processes-per-gpu", type=int, default=2)
    parser.add_argument("--autoscale", action="store_true", help="autoscale 1..N replicas")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--frame-size", help="WxH instead of 1920x1080 (smoke tests)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    frame_size = None
    if args.frame_size:
        width, height = (int(v) for v in args.frame_size.split("x"))
        frame_size = (width, height)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.scaling_bench " + " ".join(argv or sys.argv[1:]),
        "runs": [],
    }
    for gpus in [int(n) for n in args.gpus.split(",")]:
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_cluster(
                Path(args.config),
                Path(tmp),
                num_cpus=args.cpus,
                num_gpus=gpus,
                edit=lambda c, n=gpus: scale_config(
                    c, n, args.routers_per_gpu, args.autoscale, args.rmbg_dir
                ),
            ) as cluster,
        ):
            for scenario in args.scenarios.split(","):
                processes = max(1, args.client_processes_per_gpu * max(1, gpus))
                result = drive(cluster.url, scenario, gpus, processes, args.duration, frame_size)
                result.update(gpus=gpus, replicas=placement(cluster.url))
                report["runs"].append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "replicas"}), flush=True)
                time.sleep(2)
    fewest = min(run["gpus"] for run in report["runs"])
    for run in report["runs"]:
        base = next(
            r for r in report["runs"] if r["scenario"] == run["scenario"] and r["gpus"] == fewest
        )
        run["scaling_vs_fewest_gpus"] = round(
            run["steady_frames_per_s"] / max(1e-9, base["steady_frames_per_s"]), 2
        )
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
