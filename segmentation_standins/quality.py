"""Scores of a stand-in's answers against the synthetic ground truth (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segmentation_standins.synthetic import MASK_THRESHOLD, Scene


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum()) / union if union else 1.0


def matte_iou(matte: np.ndarray, scene: Scene) -> float:
    """IoU of a uint8 matte (foreground from 128) with the scene's union matte (from 0.5)."""
    return mask_iou(matte >= 128, scene.alpha >= MASK_THRESHOLD)


def instance_recall(
    found: Sequence[tuple[int, np.ndarray]], scene: Scene, min_iou: float = 0.8
) -> tuple[int, int]:
    """(matched, total): ground-truth products that some found ``(class_id, mask)`` of the same
    class covers with mask IoU >= ``min_iou``; each found instance matches at most once."""
    used: set[int] = set()
    matched = 0
    for truth, class_id in zip(scene.masks, scene.class_ids, strict=True):
        best, best_iou = -1, min_iou
        for index, (found_class, mask) in enumerate(found):
            if index in used or found_class != int(class_id):
                continue
            iou = mask_iou(mask, truth)
            if iou >= best_iou:
                best, best_iou = index, iou
        if best >= 0:
            used.add(best)
            matched += 1
    return matched, len(scene.masks)
