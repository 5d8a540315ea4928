"""CPU per cutout: compose + encode of 1080p RGBA cutouts and mattes, per core.

A GPU replica encodes every RGBA cutout (``segmentation.encoders``; composed on its device,
or by OpenCV for frames it decoded on the host) on its codec threads, one per CPU Ray gave
it; the Router encodes what it composes itself. This measures, on mattes that look like real
ones, what one frame costs and whether the encoder scales over threads (it only does if it
works outside the interpreter lock):

- ``product`` mattes: 1080p synthetic product shots (``segmentation_standins.synthetic``: one
  to three products, feathered 0.6-2 px edges, sensor noise on the pixels), the ground-truth
  soft matte quantised to uint8 as RMBG-2.0's is (``round(255 * alpha)``), so the background is
  exactly 0, as in a real matte.
- ``dense`` mattes: the same frames under a smooth matte that is nowhere 0 (what a model with
  random weights returns): the worst case, every pixel of the frame kept.

Every row is checked for exactness: its bytes are decoded with Pillow (as the client does)
and compared with :func:`cutout_rgba` (or the matte for ``mask`` rows); a lossy row fails the
run. Per row: ms per frame (median over frames and repeats, one thread), cutouts/s per core,
bytes per frame, and for the rows in ``--thread-rows`` the frames/s with 1..N threads encoding
at once (``speedup`` over one thread: about N where the encoder releases the GIL, given N idle
cores), and ``gil_free_share``: how much a pure-Python thread (the router's event loop) still
gets done while an encode runs beside it (about 1: the encoder works off the interpreter lock;
near 0: it holds it). The share is a ratio of two interleaved measurements, so it stays
readable on a loaded machine where the threaded frames/s do not.

    python -m benchmarks.encode_bench --scenes 4 --out encode.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from segmentation.encoders import compose_rgba, mask_png, png, rgba_png
from segmentation_client.wire import cutout_rgba
from segmentation_standins import synthetic

Encode = Callable[[np.ndarray, np.ndarray], bytes]

_STRATEGIES = {
    "default": cv2.IMWRITE_PNG_STRATEGY_DEFAULT,
    "rle": cv2.IMWRITE_PNG_STRATEGY_RLE,
    "fixed": cv2.IMWRITE_PNG_STRATEGY_FIXED,
    "filtered": cv2.IMWRITE_PNG_STRATEGY_FILTERED,
}
_FILTERS = {
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
    "adaptive": cv2.IMWRITE_PNG_FAST_FILTERS,
}


@dataclass(frozen=True)
class Row:
    name: str
    output: str  # "rgba" or "mask": what the decoded bytes must equal
    encode: Encode


def _pil(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _pil_rgba(level: int, compress_type: int = -1) -> Encode:
    def encode(frame: np.ndarray, alpha: np.ndarray) -> bytes:
        image = Image.fromarray(cutout_rgba(frame, alpha), mode="RGBA")
        return _pil(image, "PNG", compress_level=level, compress_type=compress_type)

    return encode


def _cv2_params(level: int, strategy: str, png_filter: str) -> list[int]:
    return [
        cv2.IMWRITE_PNG_COMPRESSION,
        level,
        cv2.IMWRITE_PNG_STRATEGY,
        _STRATEGIES[strategy],
        cv2.IMWRITE_PNG_FILTER,
        _FILTERS[png_filter],
    ]


def _cv2_rgba(level: int, strategy: str, png_filter: str) -> Encode:
    params = _cv2_params(level, strategy, png_filter)

    def encode(frame: np.ndarray, alpha: np.ndarray) -> bytes:
        bgra = cv2.cvtColor(cutout_rgba(frame, alpha), cv2.COLOR_RGBA2BGRA)
        ok, data = cv2.imencode(".png", bgra, params)
        assert ok
        return data.tobytes()

    return encode


def _cv2_mask(level: int, strategy: str, png_filter: str) -> Encode:
    params = _cv2_params(level, strategy, png_filter)

    def encode(frame: np.ndarray, alpha: np.ndarray) -> bytes:
        ok, data = cv2.imencode(".png", alpha, params)
        assert ok
        return data.tobytes()

    return encode


def _webp_lossless(frame: np.ndarray, alpha: np.ndarray) -> bytes:
    image = Image.fromarray(cutout_rgba(frame, alpha), mode="RGBA")
    return _pil(image, "WEBP", lossless=True, method=0, quality=0, exact=True)


def rows() -> list[Row]:
    out = [
        Row("shipped rgba_png", "rgba", rgba_png),
        Row("pillow png L1 (before)", "rgba", _pil_rgba(1)),
        Row("pillow png L1 Z_RLE", "rgba", _pil_rgba(1, 3)),
        Row("pillow png L3", "rgba", _pil_rgba(3)),
        Row("pillow png L6 (Pillow default)", "rgba", _pil_rgba(6)),
    ]
    for strategy, png_filter in (
        ("default", "adaptive"),
        ("default", "sub"),
        ("default", "up"),
        ("fixed", "up"),
        ("rle", "none"),
        ("rle", "sub"),
        ("rle", "up"),
        ("rle", "paeth"),
        ("rle", "adaptive"),
    ):
        out.append(
            Row(
                f"cv2 png L1 {strategy} {png_filter}", "rgba", _cv2_rgba(1, *[strategy, png_filter])
            )
        )
    out += [
        Row("cv2 png L3 rle sub", "rgba", _cv2_rgba(3, "rle", "sub")),
        Row("isal png L0 up", "rgba", lambda frame, alpha: png(compose_rgba(frame, alpha), 0)),
        Row("isal png L2 up", "rgba", lambda frame, alpha: png(compose_rgba(frame, alpha), 2)),
        Row("pillow webp lossless m0", "rgba", _webp_lossless),
        Row("shipped mask_png", "mask", lambda frame, alpha: mask_png(alpha)),
        Row(
            "pillow mask png L1 (before)",
            "mask",
            lambda frame, alpha: _pil(Image.fromarray(alpha, mode="L"), "PNG", compress_level=1),
        ),
        Row("cv2 mask png L1 rle sub", "mask", _cv2_mask(1, "rle", "sub")),
        Row("cv2 mask png L1 rle up", "mask", _cv2_mask(1, "rle", "up")),
    ]
    return out


def product_frames(
    seed: int, count: int, width: int, height: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    frames = []
    for index in range(count):
        shot = synthetic.scene(seed, index, width, height)
        alpha = np.round(shot.alpha * 255.0).astype(np.uint8)
        frames.append((shot.image, alpha))
    return frames


def dense_frames(
    frames: list[tuple[np.ndarray, np.ndarray]], seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same frames under smooth mattes in 1..255 (no pixel hidden)."""
    rng = np.random.default_rng(seed)
    out = []
    for image, _ in frames:
        height, width = image.shape[:2]
        coarse = rng.random((height // 32 + 1, width // 32 + 1)).astype(np.float32)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        out.append((image, np.clip(smooth * 254 + 1, 1, 255).astype(np.uint8)))
    return out


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def check_exact(row: Row, frame: np.ndarray, alpha: np.ndarray, data: bytes) -> None:
    expected = cutout_rgba(frame, alpha) if row.output == "rgba" else alpha
    got = decoded(data)
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise SystemExit(f"{row.name}: decoded output differs from the input (not lossless)")


def single_thread(
    row: Row, frames: list[tuple[np.ndarray, np.ndarray]], repeat: int
) -> dict[str, Any]:
    times, sizes = [], []
    for frame, alpha in frames:
        data = row.encode(frame, alpha)  # warm-up, and the exactness check
        check_exact(row, frame, alpha, data)
        sizes.append(len(data))
        for _ in range(repeat):
            started = time.perf_counter()
            row.encode(frame, alpha)
            times.append(time.perf_counter() - started)
    ms = float(np.median(times)) * 1e3
    return {
        "ms_per_frame": round(ms, 2),
        "ms_min": round(min(times) * 1e3, 2),
        "per_core_per_s": round(1e3 / ms, 2),
        "bytes_per_frame": int(np.mean(sizes)),
        "exact": True,
    }


def threaded(
    row: Row, frames: list[tuple[np.ndarray, np.ndarray]], threads: int, rounds: int
) -> dict[str, Any]:
    """frames/s with ``threads`` threads encoding at once, ``rounds`` frames each."""
    work = [frames[i % len(frames)] for i in range(threads * rounds)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda fa: row.encode(*fa), work[:threads]))
        started = time.perf_counter()
        list(pool.map(lambda fa: row.encode(*fa), work))
        elapsed = time.perf_counter() - started
    return {"threads": threads, "frames_per_s": round(len(work) / elapsed, 2)}


def _count_for(seconds: float) -> int:
    """Iterations of a pure-Python loop in ``seconds``: what a thread that needs the
    interpreter lock (the router's event loop) gets done."""
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def _encode_times(row: Row, frame: np.ndarray, alpha: np.ndarray, times: int) -> None:
    for _ in range(times):
        row.encode(frame, alpha)


def gil_free_share(row: Row, frames: list[tuple[np.ndarray, np.ndarray]], rounds: int) -> float:
    """Share of a pure-Python thread's progress that survives one encode running beside it:
    about 1 where the encoder works off the interpreter lock (given a free core), near 0 where
    it holds the lock. Alone and beside an encode alternate, so load on the machine hits both;
    the encode is repeated so that it covers the whole counting window."""
    beside, alone = 0, 0
    for i in range(rounds):
        frame, alpha = frames[i % len(frames)]
        started = time.perf_counter()
        row.encode(frame, alpha)
        window = (time.perf_counter() - started) * 0.8
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(_encode_times, row, frame, alpha, 3)
            time.sleep(0.005)
            beside += _count_for(window)
            job.result()
        alone += _count_for(window)
    return round(beside / alone, 3)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=4, help="product shots per matte kind")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--repeat", type=int, default=3, help="timed encodes per frame and row")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="most threads at once"
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="frames per thread in the threaded runs"
    )
    parser.add_argument(
        "--thread-rows",
        default="shipped rgba_png,pillow png L1 (before),pillow webp lossless m0,shipped mask_png",
        help="comma-separated row names to run with 1..--threads threads",
    )
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--mattes", default="product,dense", help="product, dense or both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)  # one encode, one core: the router runs many at once
    products = product_frames(args.seed, args.scenes, args.width, args.height)
    sets = {"product": products, "dense": dense_frames(products, args.seed)}
    chosen = [r for r in rows() if not args.only or r.name in args.only.split(",")]
    thread_rows = set(args.thread_rows.split(","))
    results: list[dict[str, Any]] = []
    for kind in args.mattes.split(","):
        frames = sets[kind]
        kept = float(np.mean([(alpha > 0).mean() for _, alpha in frames]))
        for row in chosen:
            result: dict[str, Any] = {"mattes": kind, "kept_share": round(kept, 3), "row": row.name}
            result |= single_thread(row, frames, args.repeat)
            if row.name in thread_rows:
                result["gil_free_share"] = gil_free_share(row, frames, args.rounds)
                scaling = [
                    threaded(row, frames, n, args.rounds) for n in range(1, args.threads + 1)
                ]
                for entry in scaling:
                    entry["speedup"] = round(entry["frames_per_s"] / scaling[0]["frames_per_s"], 2)
                result["threads"] = scaling
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": Image.__version__,
            "opencv": cv2.__version__,
            "load_average": os.getloadavg(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
