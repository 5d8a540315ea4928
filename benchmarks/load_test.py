"""Bounded HTTP load generator for a running product-segmentor.

Drives one endpoint with a fixed number of concurrent clients (or a fixed request rate) for a
fixed time, then reports requests sent and answered, status counts, latency percentiles,
frames per second and GPU memory per replica (from ``/v1/models``). Every request is answered
or counted as a client error: sent == answered + client_errors, always.

    python -m benchmarks.load_test --url http://127.0.0.1:8000 --endpoint remove-background \\
        --concurrency 32 --duration 30 --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import statistics
import sys
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image

ENDPOINTS = {
    "remove-background": "/v1/remove-background",
    "segment": "/v1/segment",
    "products": "/v1/products",
    "frames-remove-background": "/v1/frames?task=remove-background",
    "frames-segment": "/v1/frames?task=segment",
}


def synthetic_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A product-like 1080p frame: textured background, a coloured object in the middle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frame = (rng.normal(200, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
    inside = ((xx - width / 2) / (width / 5)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 <= 1
    frame[inside] = (170, 40, 35)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


async def run_load(
    url: str,
    endpoint: str,
    *,
    concurrency: int,
    duration_s: float,
    frames_per_request: int = 1,
    rate: float | None = None,
    width: int = 1920,
    height: int = 1080,
    timeout_ms: int | None = None,
) -> dict[str, Any]:
    images = [synthetic_jpeg(width, height, seed) for seed in range(8)]
    path = ENDPOINTS[endpoint]
    multi = endpoint.startswith("frames")
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    frames_ok = 0
    sent = 0
    completions: list[tuple[float, int]] = []  # (monotonic time, frames) of each 200
    stop_at = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-Request-Timeout-Ms": str(timeout_ms)} if timeout_ms else {}

    async def one(http: httpx.AsyncClient, index: int) -> None:
        nonlocal frames_ok, sent
        sent += 1
        started = time.perf_counter()
        try:
            if multi:
                files = [
                    ("frames", (f"{i}.jpg", images[(index + i) % len(images)], "image/jpeg"))
                    for i in range(frames_per_request)
                ]
                response = await http.post(path, files=files, headers=headers)
            else:
                response = await http.post(
                    path,
                    content=images[index % len(images)],
                    headers={**headers, "Content-Type": "image/jpeg"},
                )
            await response.aread()
        except httpx.HTTPError as exc:
            statuses[f"client_error:{type(exc).__name__}"] += 1
            return
        latencies.append(time.perf_counter() - started)
        statuses[str(response.status_code)] += 1
        if response.status_code == 200:
            if multi:
                body = response.json()
                count = body["count"] - body["failed"]
            else:
                count = 1
            frames_ok += count
            completions.append((time.monotonic(), count))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.monotonic()
        cpu_started = time.process_time()
        if rate is None:

            async def worker(worker_id: int) -> None:
                index = worker_id
                while time.monotonic() < stop_at:
                    await one(http, index)
                    index += concurrency

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        else:
            tasks: list[asyncio.Task[None]] = []
            index = 0
            semaphore = asyncio.Semaphore(concurrency * 4)  # bounded: never an unbounded backlog

            async def paced(i: int) -> None:
                async with semaphore:
                    await one(http, i)

            while time.monotonic() < stop_at:
                tasks.append(asyncio.create_task(paced(index)))
                index += 1
                await asyncio.sleep(1.0 / rate)
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        ramp = min(3.0, duration_s / 4)
        # Near 1.0 the load generator itself (one Python process) is the bound, not the service.
        client_cpu = (time.process_time() - cpu_started) / elapsed
        listing = (await http.get("/v1/models")).json()
        models = listing["models"]

    answered = sum(v for k, v in statuses.items() if not k.startswith("client_error"))
    return {
        "endpoint": endpoint,
        "concurrency": concurrency,
        "rate": rate,
        "frames_per_request": frames_per_request,
        "frame_size": [width, height],
        "duration_s": round(elapsed, 2),
        "requests_sent": sent,
        "responses_received": answered,
        "statuses": dict(statuses),
        "server_errors_other_than_503": sum(
            v for k, v in statuses.items() if k.startswith("5") and k != "503"
        ),
        "frames_ok": frames_ok,
        "frames_per_s": round(frames_ok / elapsed, 2),
        # Frames answered between the end of the ramp-up and the end of sending, per second:
        # the rate the service sustains, without the start and the drain of the last requests.
        "steady_frames_per_s": round(
            sum(n for t, n in completions if started + ramp <= t <= stop_at)
            / max(1e-9, stop_at - started - ramp),
            2,
        ),
        "steady_window_s": round(stop_at - started - ramp, 2),
        "client_cpu_per_wall_s": round(client_cpu, 2),
        "latency_ms": {
            "p50": round(percentile(latencies, 50) * 1000, 1),
            "p95": round(percentile(latencies, 95) * 1000, 1),
            "p99": round(percentile(latencies, 99) * 1000, 1),
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        },
        "replicas": [
            {
                "model": m["name"],
                "precision": m["precision"],
                "batch": m["batch"],
                "gpu_memory": m["gpu_memory"],
                "gpu": m.get("gpu"),
                "stages": m.get("stages"),
            }
            for m in models
        ],
        "router": listing.get("router"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="remove-background")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=None, help="requests/s (open loop)")
    parser.add_argument("--frames-per-request", type=int, default=8)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--timeout-ms", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_load(
            args.url,
            args.endpoint,
            concurrency=args.concurrency,
            duration_s=args.duration,
            frames_per_request=args.frames_per_request,
            rate=args.rate,
            width=args.width,
            height=args.height,
            timeout_ms=args.timeout_ms,
        )
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    lost = result["requests_sent"] - result["responses_received"]
    return 1 if lost or result["server_errors_other_than_503"] else 0


if __name__ == "__main__":
    sys.exit(main())
