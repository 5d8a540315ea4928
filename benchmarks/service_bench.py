"""Service-level benchmark on one GPU: the Serve app under HTTP load, both models sharing it.

Starts a local Ray cluster, deploys ``--config`` (default configs/gpu-bench.yaml: random
weights) with ``serve deploy``, then drives each scenario with ``benchmarks.load_test``:
single-frame requests at saturation, the multi-frame endpoint, and an open-loop run at half
the measured capacity for latency. YOLO is measured with n, then redeployed with x.

    python -m benchmarks.service_bench --rmbg-dir third_party/rmbg20 --out service.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.load_test import run_load
from tests.conftest import REPO_ROOT
from tests.serve_cluster import running_cluster


def _set_models(config: dict[str, Any], rmbg_dir: str, yolo: str) -> None:
    args = config["applications"][0]["args"]
    args["rmbg"]["model"] = str(Path(rmbg_dir).resolve())
    args["yolo"]["model"] = yolo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "gpu-bench.yaml"))
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.service_bench " + " ".join(argv or sys.argv[1:]),
        "runs": [],
    }

    def record(label: str, result: dict[str, Any]) -> dict[str, Any]:
        result["scenario"] = label
        results["runs"].append(result)
        brief = {
            k: result[k]
            for k in (
                "frames_per_s",
                "steady_frames_per_s",
                "client_cpu_per_wall_s",
                "latency_ms",
                "statuses",
                "requests_sent",
                "responses_received",
                "router",
            )
        }
        brief["replicas"] = [
            {k: r[k] for k in ("model", "batch", "stages")} for r in result["replicas"]
        ]
        print(label, json.dumps(brief), flush=True)
        return result

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_cluster(
            Path(args.config),
            Path(tmp),
            num_cpus=16,
            num_gpus=1,
            edit=lambda c: _set_models(c, args.rmbg_dir, "yolo11n-seg.yaml"),
        ) as cluster,
    ):
        load = lambda endpoint, **kw: asyncio.run(  # noqa: E731
            run_load(cluster.url, endpoint, **{"duration_s": args.duration, **kw})
        )
        load("remove-background", concurrency=32, duration_s=5)  # warm the HTTP path
        rmbg = record(
            "rmbg single-frame, saturating (64 clients)", load("remove-background", concurrency=64)
        )
        record(
            "rmbg /v1/frames, 8 frames/request (16 clients)",
            load("frames-remove-background", concurrency=16, frames_per_request=8),
        )
        capacity = rmbg["frames_per_s"]
        record(
            f"rmbg single-frame at half capacity ({capacity / 2:.1f} req/s, open loop)",
            load("remove-background", concurrency=64, rate=max(1.0, capacity / 2)),
        )
        record(
            "yolo11n-seg /v1/frames, 16 frames/request (32 clients)",
            load("frames-segment", concurrency=32, frames_per_request=16),
        )
        record("yolo11n-seg single-frame (128 clients)", load("segment", concurrency=128))
        record(
            "yolo11n-seg /v1/frames, 64x64 JPEGs, 16 frames/request (32 clients): the HTTP "
            "path's per-frame cost without the bytes",
            load("frames-segment", concurrency=32, frames_per_request=16, width=64, height=64),
        )
        config = cluster.app_config()
        _set_models(config, args.rmbg_dir, "yolo11x-seg.yaml")
        cluster.deploy(config, "yolo-x.yaml")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = cluster.status()["applications"]["product-segmentor"]["status"]
            if status == "RUNNING":
                break
            time.sleep(3)
        record(
            "yolo11x-seg /v1/frames, 16 frames/request (32 clients)",
            load("frames-segment", concurrency=32, frames_per_request=16),
        )
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
