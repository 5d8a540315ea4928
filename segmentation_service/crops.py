"""Crop boxes for ``/v1/products``: each detected object with a margin, cut out on its own.

Only the boxes are computed here (the router holds no pixels); the RMBG-2.0 replica cuts
them out of the image it decodes, as views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def crop_box(box: Sequence[float], margin: float, width: int, height: int) -> list[int]:
    """``box`` (xyxy) grown by ``margin`` x its size on each side, clipped to the
    ``width`` x ``height`` image, as integer ``[left, top, right, bottom]`` (never empty)."""
    x1, y1, x2, y2 = box
    pad_x, pad_y = (x2 - x1) * margin, (y2 - y1) * margin
    left = min(width - 1, max(0, int(x1 - pad_x)))
    top = min(height - 1, max(0, int(y1 - pad_y)))
    right = min(width, max(left + 1, math.ceil(x2 + pad_x)))
    bottom = min(height, max(top + 1, math.ceil(y2 + pad_y)))
    return [left, top, right, bottom]


def box_pixels(box: Sequence[int]) -> int:
    left, top, right, bottom = box
    return (right - left) * (bottom - top)
