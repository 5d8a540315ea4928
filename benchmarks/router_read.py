"""A Router's CPU to read one /v1/frames body: Starlette's form parser against ``file_parts``.

Starlette copies each file part into a spooled file (on disk past 1 MB) and reads it back;
``segmentation_service.inputs.file_parts`` drives the same python-multipart parser and copies
each file once. This times both on one multipart body of synthetic frames (the load test's
own) and checks they find the same files::

    python -m benchmarks.router_read --frames 16 --frame-size 1920x1080 --out router-read.json
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from typing import Any

import httpx
from starlette.datastructures import UploadFile
from starlette.requests import Request

from benchmarks.checked import finish
from benchmarks.frames import frame_set
from segmentation_service.inputs import file_parts, parse_form


async def _starlette(content_type: str, body: bytes, count: int) -> list[bytes]:
    headers = [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": "POST", "headers": headers}
    form = await parse_form(Request(scope), body, max_files=count + 1, max_fields=count + 16)
    return [await f.read() for f in form.getlist("frames") if isinstance(f, UploadFile)]


async def _ms_per_frame(fn: Any, runs: int, frames: int) -> float:
    """Mean milliseconds per frame of ``fn`` (sync or async) over ``runs`` calls, in one
    event loop (a loop per call costs more than the parse)."""

    async def once() -> Any:
        result = fn()
        return await result if asyncio.iscoroutine(result) else result

    await once()
    started = time.perf_counter()
    for _ in range(runs):
        await once()
    return round((time.perf_counter() - started) / runs / frames * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16, help="frames in the body")
    parser.add_argument("--frame-size", default="1920x1080", help="WxH")
    parser.add_argument("--source", default="plain", help="benchmarks.frames source")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.frame_size.split("x"))
    jpegs = frame_set(args.source, width, height, count=args.frames).jpegs
    files = [("frames", (f"f{i}.jpg", jpeg, "image/jpeg")) for i, jpeg in enumerate(jpegs)]
    request = httpx.Request("POST", "http://router/v1/frames", files=files)
    content_type, body = request.headers["content-type"], request.read()
    count = len(files)
    same = (
        asyncio.run(_starlette(content_type, body, count))
        == file_parts(content_type, body, "frames", count + 1, count + 16)
        == list(jpegs)
    )
    result = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "frames": count,
        "kb_per_frame": round(len(body) / count / 1024, 1),
        "ms_per_frame": {
            "starlette form": asyncio.run(
                _ms_per_frame(lambda: _starlette(content_type, body, count), args.runs, count)
            ),
            "file_parts": asyncio.run(
                _ms_per_frame(
                    lambda: file_parts(content_type, body, "frames", count + 1, count + 16),
                    args.runs,
                    count,
                )
            ),
        },
        "same_files": same,
    }
    return finish(result, args.out, same)


if __name__ == "__main__":
    raise SystemExit(main())
