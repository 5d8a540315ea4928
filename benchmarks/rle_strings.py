"""The COCO strings of a YOLO batch's masks: all masks at once against one at a time.

A YOLO replica's batch postprocess finds where each instance mask changes value on the
device, then turns those positions into COCO strings on the host: 14% of its GPU thread's
samples in the 2026-11-28 profile (docs/benchmarks.md) when that was a Python list of counts
per mask, handed to pycocotools. This times both on the masks of synthetic 1080p product shots
(the ground truth's, 2-3 products a shot), from the same positions, and checks the strings
are the same::

    python -m benchmarks.rle_strings --frames 64 --out rle-strings.json
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from benchmarks.checked import finish, median_ms
from segmentation.rle import change_positions, coco_strings
from segmentation_standins import synthetic


def pycocotools_strings(changes: list[np.ndarray], height: int, width: int) -> list[dict[str, Any]]:
    """pycocotools' strings of masks given by where each changes value (column-major pixel
    positions, a position two runs share given twice): their counts as a Python list, one
    ``frPyObjects`` call for them all, as the segmentor did before :func:`coco_strings`."""
    total = height * width
    uncompressed = []
    for positions in changes:
        twice = np.flatnonzero(positions[1:] == positions[:-1])
        kept = np.delete(positions, np.concatenate((twice, twice + 1)))
        counts = np.diff(kept, prepend=0, append=total)
        if len(kept) and kept[-1] == total:
            counts = counts[:-1]
        uncompressed.append({"counts": counts.tolist(), "size": [height, width]})
    return [
        {"size": [height, width], "counts": rle["counts"].decode()}
        for rle in mask_utils.frPyObjects(uncompressed, height, width)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=64, help="frames in the batch")
    parser.add_argument("--distinct", type=int, default=16, help="distinct shots among them")
    parser.add_argument("--frame-size", default="1920x1080")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.frame_size.split("x"))
    shots = list(synthetic.scenes(7, args.distinct, width, height))
    masks = [shots[i % len(shots)].masks for i in range(args.frames)]
    stacked = torch.from_numpy(np.concatenate(masks))
    count = stacked.shape[0]
    whole = np.array([[0, height, 0, width]] * count)
    mask_ids, positions = change_positions(stacked, whole, height)
    changes = np.split(positions, np.searchsorted(mask_ids, np.arange(1, count)))
    batch = coco_strings(mask_ids, positions, count, height, width)
    cpu = torch.device("cpu")
    one_by_one = pycocotools_strings(changes, height, width)
    report = {
        "frames": args.frames,
        "frame_size": f"{width}x{height}",
        "instances": count,
        "string_bytes": sum(len(s["counts"]) for s in batch),
        "same_strings": batch == one_by_one,
        "all_at_once_ms": median_ms(
            lambda: coco_strings(mask_ids, positions, count, height, width), cpu, args.runs
        ),
        "one_at_a_time_ms": median_ms(
            lambda: pycocotools_strings(changes, height, width), cpu, args.runs
        ),
    }
    return finish(report, args.out, agree=report["same_strings"])


if __name__ == "__main__":
    raise SystemExit(main())
