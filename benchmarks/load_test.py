"""Bounded load generator for a running product-segmentor, over HTTP or gRPC.

Drives one endpoint with a fixed number of concurrent clients (or a fixed request rate) for a
fixed time, then reports requests sent and answered, status counts, latency percentiles,
frames per second (whole window and steady state) and the CPU this process used per second of
wall time. Every request is answered or counted as a client error: sent == answered +
client_errors, always.

One process drives at most about 1,000 small frames/s before its own interpreter is the
bound (``client_cpu_per_wall_s`` near 1.0 says so); ``benchmarks.fleet`` runs several of
these at once and sums them. Clients are spread over every ``--url`` given (the Router
replicas' own ports when there is no proxy in front of them).

    python -m benchmarks.load_test --url http://127.0.0.1:8000 --endpoint remove-background \\
        --concurrency 32 --duration 30 --out result.json
    python -m benchmarks.load_test --transport grpc --url grpc://127.0.0.1:9000 \\
        --endpoint frames-segment --frames-per-request 16 --concurrency 32 --duration 30

``--frames synthetic`` sends synthetic product shots (``benchmarks.frames``: 2-3 products each,
ground truth known) instead of the plain test card, so a trained YOLO finds objects: the
report then says how many instances per frame were found, and the bytes of their RLE masks
and of the answers per frame, beside the ground-truth objects per frame.

gRPC uses the project's generated stubs (``segmentation_client/proto``, the ``[grpc]`` extra)
on ``grpc.aio``; gRPC status codes are counted by name (``grpc:UNAVAILABLE`` is the 503 of
gRPC). Where ``grpcio`` or the stubs are missing, ``--transport grpc`` exits 2 and says why.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.frames import FRAME_SOURCES, frame_set, read_frames

ENDPOINTS = {
    "remove-background": "/v1/remove-background",
    "segment": "/v1/segment",
    "products": "/v1/products",
    "frames-remove-background": "/v1/frames?task=remove-background",
    "frames-segment": "/v1/frames?task=segment",
}
TRANSPORTS = ("http", "grpc")
#: gRPC answers that mean the service failed (UNAVAILABLE is its 503, with retry-after).
SERVER_ERRORS = {"grpc:INTERNAL", "grpc:UNKNOWN", "grpc:DATA_LOSS"}


@dataclass(frozen=True)
class Answer:
    """One request's outcome: its status, the frames answered and what they held."""

    status: str
    frames: int = 0
    instances: int = 0  # instances (``segment``) or products (``products``) in the answer
    rle_bytes: int = 0  # COCO RLE ``counts`` strings of those instances
    body_bytes: int = 0  # the answer's body (HTTP) or message (gRPC)


#: One request: (index of the first image, frames in it) -> its answer.
Call = Callable[[int, int], Awaitable[Answer]]


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


def grpc_unavailable() -> str | None:
    """Why ``--transport grpc`` cannot run here, or None when it can."""
    import importlib.util

    for module in ("grpc", "segmentation_client.proto.segmentor_pb2_grpc"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{module} is not installed: gRPC load needs the [grpc] extra and its stubs"
    return None


def _found(frames: list[dict[str, Any]]) -> tuple[int, int]:
    """(instances or products, bytes of their RLE counts) in answered frames' JSON."""
    instances = [i for f in frames for i in f.get("instances", ())]
    products = sum(len(f.get("products", ())) for f in frames)
    return len(instances) + products, sum(len(i["mask"]["counts"]) for i in instances)


def _http_calls(
    urls: list[str], endpoint: str, images: list[bytes], concurrency: int, headers: dict[str, str]
) -> tuple[list[Call], list[httpx.AsyncClient]]:
    """One call per worker, workers spread over ``urls`` round-robin; raw httpx, so the load
    generator spends its CPU on the wire and not on decoding answers it does not need."""
    path = ENDPOINTS[endpoint]
    multi = endpoint.startswith("frames")
    per_url = max(1, -(-concurrency // len(urls)))
    limits = httpx.Limits(max_connections=per_url, max_keepalive_connections=per_url)
    clients = [httpx.AsyncClient(base_url=url, timeout=120, limits=limits) for url in urls]

    def call_for(http: httpx.AsyncClient) -> Call:
        async def call(index: int, frames: int) -> Answer:
            if multi:
                files = [
                    ("frames", (f"{i}.jpg", images[(index + i) % len(images)], "image/jpeg"))
                    for i in range(frames)
                ]
                response = await http.post(path, files=files, headers=headers)
            else:
                response = await http.post(
                    path,
                    content=images[index % len(images)],
                    headers={**headers, "Content-Type": "image/jpeg"},
                )
            await response.aread()
            if response.status_code != 200:
                return Answer(str(response.status_code))
            size = len(response.content)
            if not multi and endpoint == "remove-background":
                return Answer("200", 1, body_bytes=size)
            body = response.json()
            if not multi:
                found = _found([body])
                return Answer("200", 1, *found, body_bytes=size)
            answered = [f for f in body["frames"] if "error" not in f]
            return Answer("200", len(answered), *_found(answered), body_bytes=size)

        return call

    return [call_for(clients[i % len(clients)]) for i in range(concurrency)], clients


def _grpc_calls(
    urls: list[str], endpoint: str, images: list[bytes], concurrency: int
) -> tuple[list[Call], list[Any]]:
    """One call per worker on the project's generated stubs over ``grpc.aio`` channels (one
    per URL): the answer's protobuf is parsed, its images are not decoded."""
    import grpc

    from segmentation_client.proto import segmentor_pb2 as pb
    from segmentation_client.proto import segmentor_pb2_grpc as pb_grpc

    options = [
        ("grpc.max_send_message_length", 512 * 1024 * 1024),
        ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ]
    channels = [
        grpc.aio.insecure_channel(url.removeprefix("grpc://"), options=options) for url in urls
    ]
    stubs = [pb_grpc.SegmentorStub(channel) for channel in channels]
    task = pb.TASK_SEGMENT if endpoint.endswith("segment") else pb.TASK_REMOVE_BACKGROUND

    def call_for(stub: Any) -> Call:
        async def call(index: int, frames: int) -> Answer:
            image = images[index % len(images)]
            try:
                if endpoint.startswith("frames"):
                    batch = [images[(index + i) % len(images)] for i in range(frames)]
                    reply = await stub.Frames(pb.FramesRequest(frames=batch, task=task))
                    found = [f.segmentation for f in reply.frames if f.HasField("segmentation")]
                    answered = int(reply.count) - int(reply.failed)
                    return Answer("200", answered, *_found_pb(found), reply.ByteSize())
                if endpoint == "remove-background":
                    matte = await stub.RemoveBackground(pb.ImageRequest(image=image))
                    return Answer("200", 1, body_bytes=matte.ByteSize())
                if endpoint == "segment":
                    one = await stub.Segment(pb.SegmentRequest(image=image))
                    return Answer("200", 1, *_found_pb([one]), one.ByteSize())
                raise ValueError(f"{endpoint} has no gRPC method")
            except grpc.aio.AioRpcError as exc:
                return Answer(f"grpc:{exc.code().name}")

        return call

    return [call_for(stubs[i % len(stubs)]) for i in range(concurrency)], channels


def _found_pb(replies: list[Any]) -> tuple[int, int]:
    """(instances, bytes of their RLE counts) in ``SegmentReply`` messages."""
    instances = [i for reply in replies for i in reply.instances]
    return len(instances), sum(len(i.mask.counts) for i in instances)


async def run_load(
    url: str | list[str],
    endpoint: str,
    *,
    concurrency: int,
    duration_s: float,
    frames_per_request: int = 1,
    rate: float | None = None,
    width: int = 1920,
    height: int = 1080,
    timeout_ms: int | None = None,
    transport: str = "http",
    listing: bool = True,
    keep_latencies: bool = False,
    frames: str = "plain",
    frames_dir: str | None = None,
    gt_objects_per_frame: float | None = None,
) -> dict[str, Any]:
    """Drive ``endpoint`` for ``duration_s``; ``frames`` names the frame source
    (``benchmarks.frames``), ``frames_dir`` holds its JPEGs already rendered (a fleet's
    processes share the parent's) with ``gt_objects_per_frame`` their ground truth."""
    urls = [url] if isinstance(url, str) else list(url)
    if frames_dir:
        images = read_frames(Path(frames_dir))
    else:
        frame_source = frame_set(frames, width, height)
        images = list(frame_source.jpegs)
        gt_objects_per_frame = frame_source.mean_objects
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    completions: list[tuple[float, int]] = []  # (monotonic time, frames) of each 200
    frames_ok = 0
    found = {"instances": 0, "rle_bytes": 0, "body_bytes": 0}
    sent = 0
    lock = threading.Lock()
    headers = {"X-Request-Timeout-Ms": str(timeout_ms)} if timeout_ms else {}
    closers: list[Callable[[], Any]] = []  # each returns None or an awaitable
    if transport == "grpc":
        reason = grpc_unavailable()
        if reason:
            raise RuntimeError(reason)
        calls, channels = _grpc_calls(urls, endpoint, images, concurrency)
        closers = [channel.close for channel in channels]
    else:
        calls, http_clients = _http_calls(urls, endpoint, images, concurrency, headers)
        closers = [client.aclose for client in http_clients]

    async def one(worker: int, index: int) -> None:
        nonlocal frames_ok, sent
        sent += 1
        started = time.perf_counter()
        try:
            answer = await calls[worker % len(calls)](index, frames_per_request)
        except Exception as exc:  # any transport failure is counted, never raised
            with lock:
                statuses[f"client_error:{type(exc).__name__}"] += 1
            return
        with lock:
            latencies.append(time.perf_counter() - started)
            statuses[answer.status] += 1
            if answer.frames:
                frames_ok += answer.frames
                completions.append((time.monotonic(), answer.frames))
                found["instances"] += answer.instances
                found["rle_bytes"] += answer.rle_bytes
                found["body_bytes"] += answer.body_bytes

    started = time.monotonic()
    stop_at = started + duration_s
    cpu_started = time.process_time()
    try:
        if rate is None:

            async def worker(worker_id: int) -> None:
                index = worker_id
                while time.monotonic() < stop_at:
                    await one(worker_id, index)
                    index += concurrency

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        else:
            tasks: list[asyncio.Task[None]] = []
            index = 0
            semaphore = asyncio.Semaphore(concurrency * 4)  # bounded: never an unbounded backlog

            async def paced(i: int) -> None:
                async with semaphore:
                    await one(i, i)

            while time.monotonic() < stop_at:
                tasks.append(asyncio.create_task(paced(index)))
                index += 1
                await asyncio.sleep(1.0 / rate)
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        # Near 1.0 the load generator itself (one Python process) is the bound, not the service.
        client_cpu = (time.process_time() - cpu_started) / elapsed
        models: list[dict[str, Any]] = []
        router = None
        if listing and transport == "http":
            listed = httpx.get(f"{urls[0]}/v1/models", timeout=60).json()
            models, router = listed["models"], listed.get("router")
    finally:
        for close in closers:
            closed = close()
            if asyncio.iscoroutine(closed):
                await closed

    ramp = min(3.0, duration_s / 4)
    answered = sum(v for k, v in statuses.items() if not k.startswith("client_error"))
    result: dict[str, Any] = {
        "endpoint": endpoint,
        "transport": transport,
        "urls": urls,
        "concurrency": concurrency,
        "rate": rate,
        "frames_per_request": frames_per_request,
        "frame_size": [width, height],
        "frames": frames,
        "gt_objects_per_frame": gt_objects_per_frame,
        "duration_s": round(elapsed, 2),
        "requests_sent": sent,
        "responses_received": answered,
        "statuses": dict(statuses),
        "server_errors_other_than_503": sum(
            v for k, v in statuses.items() if k in SERVER_ERRORS or (k[0] == "5" and k != "503")
        ),
        "frames_ok": frames_ok,
        "frames_per_s": round(frames_ok / elapsed, 2),
        # What the answered frames held: instances found (products for ``products``), the
        # bytes of their RLE masks and of the whole answer, all per answered frame.
        "instances": found["instances"],
        "instances_per_frame": _per(found["instances"], frames_ok, finds_objects(endpoint)),
        "rle_bytes": found["rle_bytes"],
        "rle_bytes_per_frame": _per(found["rle_bytes"], frames_ok, answers_rle(endpoint)),
        "body_bytes": found["body_bytes"],
        "body_bytes_per_frame": _per(found["body_bytes"], frames_ok),
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
        "router": router,
    }
    if keep_latencies:
        result["latencies_ms"] = [round(s * 1000, 2) for s in latencies]
        result["window"] = {"started": started, "stop_at": stop_at, "ended": started + elapsed}
    return result


def finds_objects(endpoint: str) -> bool:
    """Whether the endpoint answers with objects (a matte has no instances to count)."""
    return endpoint in ("segment", "frames-segment", "products")


def answers_rle(endpoint: str) -> bool:
    """Whether the answer carries RLE masks (products carry cut-out PNGs instead)."""
    return endpoint in ("segment", "frames-segment")


def _per(total: int, frames: int, counted: bool = True) -> float | None:
    """``total`` per frame; None with no frame answered or nothing of the kind to count."""
    return round(total / frames, 2) if frames and counted else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", action="append", help="service URL; repeat to spread clients over several"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="http")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="remove-background")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=None, help="requests/s (open loop)")
    parser.add_argument("--frames-per-request", type=int, default=8)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument(
        "--frames",
        choices=FRAME_SOURCES,
        default="plain",
        help="plain test card, or synthetic product shots with 2-3 objects each",
    )
    parser.add_argument("--frames-dir", help="send these JPEGs (rendered by the caller)")
    parser.add_argument("--gt-objects-per-frame", type=float, help="ground truth of --frames-dir")
    parser.add_argument("--timeout-ms", type=int, default=None)
    parser.add_argument("--no-listing", action="store_true", help="skip /v1/models at the end")
    parser.add_argument("--keep-latencies", action="store_true", help="every latency in --out")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.transport == "grpc" and (reason := grpc_unavailable()):
        print(f"--transport grpc: {reason}", file=sys.stderr)
        return 2
    result = asyncio.run(
        run_load(
            args.url or ["http://127.0.0.1:8000"],
            args.endpoint,
            concurrency=args.concurrency,
            duration_s=args.duration,
            frames_per_request=args.frames_per_request,
            rate=args.rate,
            width=args.width,
            height=args.height,
            timeout_ms=args.timeout_ms,
            transport=args.transport,
            listing=not args.no_listing,
            keep_latencies=args.keep_latencies,
            frames=args.frames,
            frames_dir=args.frames_dir,
            gt_objects_per_frame=args.gt_objects_per_frame,
        )
    )
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    else:
        print(text)
    lost = result["requests_sent"] - result["responses_received"]
    return 1 if lost or result["server_errors_other_than_503"] else 0


if __name__ == "__main__":
    sys.exit(main())
