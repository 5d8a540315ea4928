"""COCO run-length encoding of masks where they are made: on the model's device.

:func:`segmentation_client.wire.encode_rle` encodes one mask on the host: the mask must first
come off the GPU whole (2 MB per instance of a 1080p frame), then pycocotools copies it to
column-major order and walks every pixel, about 2 ms of one core per instance of a 1080p
frame. With a trained YOLO that found 2-3 products per frame this was most of the YOLO
replica's time (13 ms of postprocess per frame against 0.1 ms of forward at batch 64 on an
H100, docs/benchmarks.md). Here the device finds the run boundaries of a whole chunk of
masks at once and only their positions (a few thousand integers per mask) travel; the host
turns them into the same COCO strings.

An instance mask is zero outside its box, so YOLO's masks are made and encoded as boxed crops
(:func:`encode_boxed_rle`): only the box's pixels exist on the device (a 300x400 box is 6% of a
1080p frame), and a crop's column is a piece of a frame column, at
``(left + column) * height + top + row`` in COCO's column-major order; the runs of a box as
tall as the frame join across its columns. Timings: segmentation/models/yolo_segmentor.py,
*Instance masks, box by box*.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils


def encode_rle_batch(masks: torch.Tensor) -> list[dict[str, Any]]:
    """COCO RLE of each ``[N, H, W]`` boolean (or 0/1) mask, as JSON-ready
    ``{"size": [h, w], "counts": str}``: the same strings as ``encode_rle`` of each mask."""
    count, height, width = masks.shape
    return encode_boxed_rle(masks, np.array([[0, height, 0, width]] * count), height, width)


def encode_boxed_rle(
    crops: torch.Tensor, boxes: np.ndarray, height: int, width: int
) -> list[dict[str, Any]]:
    """COCO RLE of ``height`` x ``width`` masks that are zero outside a box each.

    ``boxes`` is ``[N, 4]`` integer rows ``top, bottom`` and columns ``left, right`` of each
    box (half-open, inside the frame); ``crops`` is ``[N, h, w]`` boolean (or 0/1), on any
    device: box ``i``'s pixels from its top left corner on, zero past the box where crops of
    several sizes are padded to one. The strings are those of ``encode_rle`` of each whole
    mask; only the run boundaries come to the host.
    """
    count = crops.shape[0]
    if count == 0:
        return []
    boxes = np.asarray(boxes, dtype=np.int64).reshape(count, 4)
    top, bottom, left, right = boxes.T
    if ((top < 0) | (bottom < top) | (bottom > height)).any() or (
        (left < 0) | (right < left) | (right > width)
    ).any():
        raise ValueError(f"boxes must lie inside the {height}x{width} frame")
    # Crop columns (COCO runs go down the columns) with a zero above and below: every run then
    # starts and ends where a pixel differs from the one above it.
    columns = F.pad(crops.bool().transpose(1, 2), (1, 1))
    changes = (columns[:, :, 1:] != columns[:, :, :-1]).nonzero().cpu().numpy()
    mask_ids, column, row = changes.T  # row: of the run's first pixel, or the one after its last
    positions = (left[mask_ids] + column) * height + top[mask_ids] + row
    return _coco_strings(mask_ids, positions, count, height, width)


def _coco_strings(
    mask_ids: np.ndarray, positions: np.ndarray, count: int, height: int, width: int
) -> list[dict[str, Any]]:
    """COCO strings from the column-major positions where each mask changes value (sorted per
    mask; the first pixel of each run of ones and the pixel after it)."""
    total = height * width
    uncompressed = []
    for changes in np.split(positions, np.searchsorted(mask_ids, np.arange(1, count))):
        # A run that reaches a column's last row and one that starts at the next column's
        # first row (a box as tall as the frame) are one run: drop the position they share.
        shared = changes[1:] == changes[:-1]
        if shared.any():
            keep = np.ones(len(changes), dtype=bool)
            keep[1:] &= ~shared
            keep[:-1] &= ~shared
            changes = changes[keep]
        # Counts alternate zeros and ones and start with zeros (0 when the first pixel is set);
        # a mask whose last pixel is set ends with its run of ones.
        counts = np.diff(changes, prepend=0, append=total)
        if len(changes) and changes[-1] == total:
            counts = counts[:-1]
        uncompressed.append({"counts": counts.tolist(), "size": [height, width]})
    return [
        {"size": [height, width], "counts": rle["counts"].decode()}
        for rle in mask_utils.frPyObjects(uncompressed, height, width)
    ]
