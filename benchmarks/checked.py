"""Timing two paths of a benchmark, and its end: the figures, and whether the paths agree."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], device: torch.device, runs: int) -> float:
    """Median wall milliseconds of ``fn`` over ``runs`` calls after one more, the device
    drained around each."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def finish(result: dict[str, Any], out: str | None, agree: bool) -> int:
    """Print ``result`` as JSON, write it to ``out`` if given; the exit status: 1 when the
    paths did not ``agree`` (a faster path that answers differently is no result)."""
    print(json.dumps(result, indent=1), flush=True)
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if agree else 1


def release_memory() -> None:
    """Free what a finished variant left before the next one is measured: the fast path's
    patched ``forward`` methods make reference cycles, so ``del`` alone leaves a model (its
    weights, its CUDA graphs' pools) allocated until the cycle collector runs, and the next
    variant's peak would count it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
