"""RMBG-2.0 started from its compiled artifact, against the uncompiled fast path, in one process.

A replica's start as the service does it: the model built with ``RMBG_COMPILE`` (``--compile``) and
``RMBG_COMPILE_CACHE=DIR`` (random weights), a batch at each warm-up size
(:func:`segmentation.compile_cache.warmup_order`), CUDA graphs captured at the batch buckets:
``load_s`` and ``ready_s`` from the start of this process. Then the same weights on the
uncompiled fast path with graphs, and per path the forward's frames/s at each ``--batches``
(CUDA-graph replay, inputs at the model's input size) and the largest matte difference of
the two.
Build the artifact first::

    RMBG_MODEL=third_party/rmbg20 RMBG_TRUST_REMOTE_CODE=true \\
        python -m segmentation.compile_cache /tmp/compiled --max-batch-size 16 \\
        --load-format dummy --ahead-of-time    # --ahead-of-time: the blocks' programs too
    RMBG_MODEL=third_party/rmbg20 RMBG_TRUST_REMOTE_CODE=true \\
        python -m benchmarks.compiled_start /tmp/compiled --max-batch-size 16 --out start.json
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before torch's import: a replica's start counts it too

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.model_bench import timed  # noqa: E402
from segmentation.batching import batch_buckets  # noqa: E402
from segmentation.compile_cache import warmup_order  # noqa: E402
from segmentation.config import load_settings  # noqa: E402
from segmentation.factory import build_segmentor  # noqa: E402


def started(settings: Any, max_batch: int) -> tuple[Any, dict[str, Any]]:
    """The segmentor ready as a replica makes it, and its start-up seconds."""
    torch.manual_seed(0)
    segmentor = build_segmentor("rmbg", settings, load_format="dummy")
    report: dict[str, Any] = {"load_s": round(time.monotonic() - STARTED, 1)}
    frame = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    buckets = batch_buckets(max_batch)
    segmentor.batch_buckets = buckets  # as the builder: the decoder compiles for the largest
    for size in warmup_order(max_batch):
        segmentor.predict([frame] * size)
    report["graphs"] = segmentor.capture_graphs(buckets)
    report["graph_error"] = segmentor.graph_error
    report["inference_path"] = segmentor.inference_path
    report["compile"] = segmentor.info().compile
    return segmentor, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the artifact directory (RMBG_COMPILE_CACHE)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batches", default="16", help="batch sizes timed, e.g. 8,16")
    parser.add_argument(
        "--compile",
        default="blocks",
        help="what compiles (RMBG_COMPILE): blocks, decoder or blocks,decoder; the artifact "
        "must have been built with the same",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash in native code says where
    compiled_settings = load_settings(
        rmbg_optimized=True, rmbg_compile=args.compile, rmbg_compile_cache=args.directory
    )
    compiled, report = started(compiled_settings, args.max_batch_size)
    report["ready_s"] = round(time.monotonic() - STARTED, 1)
    print(json.dumps(report), flush=True)
    uncompiled = load_settings(rmbg_optimized=True, rmbg_compile=False)  # whatever the env says
    plain, plain_report = started(uncompiled, args.max_batch_size)
    report["uncompiled"] = plain_report
    rows = []
    generator = torch.Generator(device=compiled.device).manual_seed(1)
    for batch in (int(b) for b in args.batches.split(",")):
        side = compiled.input_size
        x = torch.rand((batch, 3, side, side), device=compiled.device, generator=generator)
        x = x.to(compiled.dtype)
        with torch.inference_mode():
            mattes = {}
            for name, segmentor in (("compiled", compiled), ("uncompiled", plain)):
                row = {
                    "path": segmentor.inference_path,
                    **timed(lambda s=segmentor, x=x: s.forward(x), batch),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                mattes[name] = (segmentor.forward(x).float().sigmoid() * 255).round()
            difference = (mattes["compiled"] - mattes["uncompiled"]).abs()
            rows.append(
                {
                    "batch": batch,
                    "matte_max_difference_255": float(difference.max()),
                    "matte_mean_difference_255": float(difference.mean()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report["rows"] = rows
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
