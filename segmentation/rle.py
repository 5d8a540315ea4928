"""COCO run-length encoding of masks where they are made: on the model's device.

:func:`segmentation_client.wire.encode_rle` encodes one mask on the host: the mask must first
come off the GPU whole (2 MB per instance of a 1080p frame), then pycocotools copies it to
column-major order and walks every pixel, about 2 ms of one core per instance of a 1080p
frame. With a trained YOLO that found 2-3 products per frame this was most of the YOLO
replica's time (13 ms of postprocess per frame against 0.1 ms of forward at batch 64 on an
H100, docs/benchmarks.md). Here the device finds the run boundaries of a whole chunk of
masks at once and only their positions (a few thousand integers per mask) travel; the host
turns them into the same COCO strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_rle_batch(masks: torch.Tensor) -> list[dict[str, Any]]:
    """COCO RLE of each ``[N, H, W]`` boolean (or 0/1) mask, as JSON-ready
    ``{"size": [h, w], "counts": str}``: the same strings as ``encode_rle`` of each mask."""
    count, height, width = masks.shape
    if count == 0:
        return []
    total = height * width
    # COCO runs go down the columns (Fortran order) and start with a run of zeros.
    flat = masks.bool().transpose(1, 2).reshape(count, total)
    ends = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()  # (mask, last pixel of a run)
    starts_set = flat[:, 0].cpu().numpy()
    per_mask = np.split(ends[:, 1] + 1, np.searchsorted(ends[:, 0], np.arange(1, count)))
    uncompressed = []
    for first_set, run_ends in zip(starts_set, per_mask, strict=True):
        counts = np.diff(run_ends, prepend=0, append=total)
        if first_set:
            counts = np.concatenate(([0], counts))
        uncompressed.append({"counts": counts.tolist(), "size": [height, width]})
    return [
        {"size": [height, width], "counts": rle["counts"].decode()}
        for rle in mask_utils.frPyObjects(uncompressed, height, width)
    ]
