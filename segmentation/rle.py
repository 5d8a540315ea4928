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
    mask_ids, positions = change_positions(crops, boxes, height)
    return coco_strings(mask_ids, positions, count, height, width)


def change_positions(
    crops: torch.Tensor, boxes: np.ndarray, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where each boxed crop's whole mask changes value, found on the crops' device: the
    mask of each change and its column-major position in a frame ``height`` rows tall (the
    first pixel of each run of ones and the pixel after it), sorted by mask, then position."""
    top, left = boxes[:, 0], boxes[:, 2]
    # Crop columns (COCO runs go down the columns) with a zero above and below: every run then
    # starts and ends where a pixel differs from the one above it.
    columns = F.pad(crops.bool().transpose(1, 2), (1, 1))
    changes = (columns[:, :, 1:] != columns[:, :, :-1]).nonzero().cpu().numpy()
    mask_ids, column, row = changes.T  # row: of the run's first pixel, or the one after its last
    return mask_ids, (left[mask_ids] + column) * height + top[mask_ids] + row


def coco_strings(
    mask_ids: np.ndarray, positions: np.ndarray, count: int, height: int, width: int
) -> list[dict[str, Any]]:
    """COCO strings from the column-major positions where each mask changes value (sorted by
    mask, then position; the first pixel of each run of ones and the pixel after it).

    All masks at once, in array operations: their run lengths, COCO's differences (each count
    after the third less the count two before it) and the 5-bit groups each difference takes
    (pycocotools' ``rleToString``: six bits a character from ``'0'``, the sixth saying another
    follows), so a batch's strings cost a few array passes instead of a Python list of counts
    per mask, each converted and encoded by pycocotools. The same strings as
    ``pycocotools.mask.frPyObjects`` of each mask's counts (unit-tested against it)."""
    total = height * width
    mask_ids = np.asarray(mask_ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    # A run that reaches a column's last row and one that starts at the next column's first
    # row (a box as tall as the frame) are one run: drop the position they share.
    shared = (positions[1:] == positions[:-1]) & (mask_ids[1:] == mask_ids[:-1])
    if shared.any():
        keep = np.ones(len(positions), dtype=bool)
        keep[1:] &= ~shared
        keep[:-1] &= ~shared
        mask_ids, positions = mask_ids[keep], positions[keep]
    masks = np.arange(count)
    starts = np.searchsorted(mask_ids, masks)
    ends = np.searchsorted(mask_ids, masks, side="right")
    # Counts alternate zeros and ones and start with zeros (0 when the first pixel is set):
    # the gaps between a mask's changes from pixel 0, then the rest of the frame, except
    # where the mask's last pixel is set (it ends with its run of ones).
    changed = ends > starts  # masks with a run of ones
    gaps = np.diff(positions, prepend=0)
    gaps[starts[changed]] = positions[starts[changed]]
    last = np.zeros(count, dtype=np.int64)
    last[changed] = positions[ends[changed] - 1]
    tail = ~changed | (last != total)
    counts = np.insert(gaps, ends[tail], total - last[tail])
    lengths = ends - starts + tail
    # COCO's differences: from the fourth count of a mask on, less the count two before it.
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    later = np.flatnonzero(np.arange(len(counts)) - first > 2)
    values = counts.copy()
    values[later] -= counts[later - 2]
    # Five bits a character, lowest first, as many as the value's bits and its sign take (a
    # value v needs bit_length(v, or ~v when negative) // 5 + 1; frexp's exponent is that
    # bit length, exact for integers below 2**53), each but the last with the "more" bit.
    _, bit_length = np.frexp(np.where(values < 0, ~values, values))
    used = bit_length.astype(np.int64) // 5 + 1
    owner = np.repeat(np.arange(len(values)), used)
    group = np.arange(len(owner)) - np.repeat(np.cumsum(used) - used, used)
    more = (group < used[owner] - 1).astype(np.int64) << 5
    characters = (((values[owner] >> (5 * group)) & 0x1F) | more) + 48
    text = characters.astype(np.uint8).tobytes().decode()
    bounds = np.concatenate(([0], np.cumsum(used)))[np.concatenate(([0], np.cumsum(lengths)))]
    return [
        {"size": [height, width], "counts": text[begin:end]}
        for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]
