"""Crops for ``/v1/products``: each detected object with a margin, cut out on its own."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def crop_with_margin(
    frame: np.ndarray, box: Sequence[float], margin: float
) -> tuple[np.ndarray, list[int]]:
    """The part of ``frame`` inside ``box`` (xyxy) grown by ``margin`` x its size on each side,
    clipped to the frame; returns the crop and its integer box."""
    height, width = frame.shape[:2]
    x1, y1, x2, y2 = box
    pad_x, pad_y = (x2 - x1) * margin, (y2 - y1) * margin
    left = min(width - 1, max(0, int(x1 - pad_x)))
    top = min(height - 1, max(0, int(y1 - pad_y)))
    right = min(width, max(left + 1, math.ceil(x2 + pad_x)))
    bottom = min(height, max(top + 1, math.ceil(y2 + pad_y)))
    return np.ascontiguousarray(frame[top:bottom, left:right]), [left, top, right, bottom]
