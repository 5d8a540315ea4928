"""Non-maximum suppression of a whole batch of YOLO predictions in one call.

Ultralytics' ``non_max_suppression`` walks the batch one image at a time: two boolean
selections and one ``torchvision.ops.nms`` per image, each waiting for the GPU. At batch 64
of the trained stand-in on an H100 that was 24.7 ms, seven times the forward
(docs/benchmarks.md). Here every image's candidates are chosen by one ``nonzero``, and one
``nms`` call suppresses them all (one per run of images with up to 32 Ki candidates): each
image's boxes are moved to a region of their own (class-aware as Ultralytics is, by its
``max_wh`` class offset, then by a power of two per image), so that no box of one image
overlaps a box of another.

Same detections, same order, as Ultralytics' path with ``multi_label=False`` and
``agnostic=False`` (what the segmentor calls): candidates, classes, scores and the greedy
order (scores sorted stably, ties by anchor) are the same arithmetic. The overlap test runs
in float64 on the float32 boxes: where torchvision's float32 kernel rounds each intersection,
area and IoU to 24 bits, this rounds them to 53. The two disagree only on an overlap whose
IoU is within float32 rounding (about 6e-8) of the threshold: on CUDA the float32 kernel
rounds such an IoU to the threshold itself and keeps the box (0.7 is not above 0.7f), which
float64 may suppress.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import nms

from segmentation.batching import bounded_runs

#: Ultralytics' defaults: the most candidates an image keeps for NMS, and the class offset.
MAX_NMS = 30000
MAX_WH = 7680
#: Candidates (of whole images) suppressed in one nms call.
MAX_CANDIDATES = 32 * 1024


def _candidate_runs(counts: list[int]) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of consecutive images with at most MAX_CANDIDATES
    candidates together (an image with more alone); images without a candidate add none."""
    starts = np.concatenate(([0], np.cumsum(counts))).tolist()
    ranges = [(starts[run.start], starts[run.stop]) for run in bounded_runs(counts, MAX_CANDIDATES)]
    return [(start, stop) for start, stop in ranges if stop > start]


def batched_nms(
    prediction: torch.Tensor,
    conf_thres: float,
    iou_thres: float,
    classes: Sequence[int] | None,
    max_det: int,
    nc: int,
) -> list[torch.Tensor] | None:
    """Detections per image, ``[n, 6 + extra]`` rows ``x1 y1 x2 y2 score class extra...``,
    best first, from ``prediction`` ``[B, 4 + nc + extra, anchors]``; None when an image has
    more than ``MAX_NMS`` candidates (Ultralytics then keeps the best by an unstable sort) or
    a box that is not finite (no region holds it): the caller runs Ultralytics' path."""
    from ultralytics.utils.ops import xywh2xyxy

    batch = prediction.shape[0]
    extra = prediction.shape[1] - 4 - nc
    scores, labels = prediction[:, 4 : 4 + nc].max(1)  # [B, anchors]; ties: the first class
    keep = scores > conf_thres
    if classes is not None:
        keep &= torch.isin(labels, torch.as_tensor(list(classes), device=prediction.device))
    image, anchor = keep.nonzero(as_tuple=True)  # image-major: each image's anchors in order
    counts = torch.bincount(image, minlength=batch)
    rows = prediction.transpose(1, 2)[image, anchor]
    box, _, mask = rows.split((4, nc, extra), 1)
    box = xywh2xyxy(box)
    label = labels[image, anchor].float()
    detections = torch.cat((box, scores[image, anchor, None], label[:, None], mask), 1)
    if not len(rows):
        return [detections] * batch
    # Ultralytics' class offset, in float32 as it computes it; then each image its own region.
    shifted = box + label[:, None] * MAX_WH
    facts = torch.cat((counts.double(), shifted.min()[None].double(), shifted.max()[None].double()))
    *counted, low, high = facts.tolist()
    host_counts = [int(count) for count in counted]
    if max(host_counts) > MAX_NMS or not math.isfinite(high - low):
        return None
    # A power of two at least the span of all boxes: image i's boxes move by i * stride, past
    # every box of the images before it (float64 holds these sums exactly while the offsets
    # stay far below 2**53 of the coordinates' precision: a box head bounds them).
    stride = 2.0 ** math.ceil(math.log2(high - low + 1.0))
    if stride * batch > 2.0**40:
        return None
    boxes = shifted.double() + (image.double() * stride)[:, None]
    scores64 = detections[:, 4].double()
    # One nms call per run of images with at most MAX_CANDIDATES candidates: the CUDA kernel
    # keeps an N x N bit mask (N = 32Ki: 128 MiB), and a batch at conf 0 has 8,400 an image.
    parts = []
    for start, stop in _candidate_runs(host_counts):
        parts.append(start + nms(boxes[start:stop], scores64[start:stop], iou_thres))
    kept = torch.cat(parts)
    # nms gives each run's kept rows best first; a stable sort by image keeps that order
    # within each image, and each image keeps its first max_det.
    kept_images = image[kept]
    order = torch.sort(kept_images, stable=True).indices
    kept, kept_images = kept[order], kept_images[order]
    per_image = np.bincount(kept_images.cpu().numpy(), minlength=batch)
    starts = np.concatenate(([0], np.cumsum(per_image)[:-1]))
    rank = np.arange(len(kept)) - np.repeat(starts, per_image)
    limited = torch.as_tensor(np.flatnonzero(rank < max_det), device=kept.device)
    chosen = detections[kept[limited]]
    sizes = np.minimum(per_image, max_det).tolist()
    return list(torch.split(chosen, sizes))
