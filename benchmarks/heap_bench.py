"""What keeping a process's heap (``heap_keep_mib``) does to a frame request's copies.

One request's buffers as the Router and a replica make them, in a fresh process per
variant, on its main thread and on a second one (Serve runs a replica's event loop on a
thread of its own): ``--frames`` files of ``--frame-kb`` sliced out of one body (the
multipart reader), the call's arguments pickled (Serve's request serialisation), wrapped into
one message (the gRPC request) and unpickled (the replica's side). Mean (the CPU it costs) and
median milliseconds per request over ``--runs`` requests::

    python -m benchmarks.heap_bench --frames 16 --frame-kb 300 --runs 300 --out heap.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT

MEASURE = """
import json, os, pickle, statistics, sys, threading, time
from segmentation.imaging import EncodedImage
from segmentation_service.resources import keep_heap

keep, frames, size, runs = (int(v) for v in sys.argv[1:5])
kept = keep_heap(keep)
body = os.urandom(frames * size)
results = {}

def request():
    files = [body[i * size : (i + 1) * size] for i in range(frames)]
    call = ([EncodedImage(f, 1920, 1080) for f in files], 0.25, 1.0)
    message = b"".join((b"metadata", pickle.dumps(call, protocol=5)))
    return pickle.loads(message[8:])

def measure(where):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        request()
        times.append((time.perf_counter() - started) * 1e3)
    results[where] = {
        "mean_ms": round(statistics.fmean(times), 3),
        "median_ms": round(statistics.median(times), 3),
    }

thread = threading.Thread(target=measure, args=("thread",))
thread.start()
thread.join()
measure("main")
print(json.dumps({"kept": kept, **results}))
"""


def run(keep_mib: int, frames: int, frame_kb: int, runs: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            str(keep_mib),
            str(frames),
            str(frame_kb * 1024),
            str(runs),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--frame-kb", type=int, default=300)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--keep-mib", default="0,256", help="variants, 0 = glibc's defaults")
    parser.add_argument("--repeat", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.heap_bench " + " ".join(argv or sys.argv[1:]),
        "frames": args.frames,
        "frame_kb": args.frame_kb,
        "variants": {},
    }
    for keep in (int(v) for v in args.keep_mib.split(",")):
        rounds = [run(keep, args.frames, args.frame_kb, args.runs) for _ in range(args.repeat)]
        report["variants"][str(keep)] = rounds
        for where in ("main", "thread"):
            print(
                f"heap_keep_mib={keep:<4} {where:<6} ms a request, mean / median: "
                + ", ".join(
                    f"{r[where]['mean_ms']:.2f} / {r[where]['median_ms']:.2f}" for r in rounds
                )
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
