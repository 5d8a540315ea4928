"""Synthetic composites whose foreground, background and soft alpha are known.

What edge-colour estimation is measured on (``tests/unit/test_refine.py``,
``benchmarks/refine_bench.py``): a smooth, colourful foreground; a background of other
colours; a matte with a blurred body edge and hair-like strands (thin, antialiased,
partly transparent curves reaching out of the body), so much of the matte is soft. The image
is ``alpha * F + (1 - alpha) * B``, quantised to 8 bits like any frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Composite:
    """A frame and its truth: ``image`` and ``alpha`` as uint8 (what a cutout is made of),
    ``foreground`` and ``background`` as float32 RGB in 0-1."""

    image: np.ndarray
    alpha: np.ndarray
    foreground: np.ndarray
    background: np.ndarray


def _smooth_colours(rng: np.random.Generator, height: int, width: int, low: float, high: float):
    """A smooth random colour field in ``[low, high]``: a few colours at coarse grid points,
    bicubically interpolated."""
    cells = rng.uniform(low, high, size=(4, 5, 3)).astype(np.float32)
    field = cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0.0, 1.0)


def soft_composite(seed: int = 0, width: int = 256, height: int = 256) -> Composite:
    """A composite with a blurred body edge and hair-like strands; see the module doc."""
    rng = np.random.default_rng(seed)
    foreground = _smooth_colours(rng, height, width, 0.45, 1.0)
    foreground[..., 0] = np.clip(foreground[..., 0] + 0.2, 0, 1)  # warm subject
    background = _smooth_colours(rng, height, width, 0.0, 0.55)
    background[..., 1] = np.clip(background[..., 1] + 0.35, 0, 1)  # green-ish backdrop

    scale = min(width, height)
    body = np.zeros((height, width), np.uint8)
    centre = (width // 2, height // 2)
    axes = (int(scale * 0.22), int(scale * 0.3))
    cv2.ellipse(body, centre, axes, 0, 0, 360, 255, -1, cv2.LINE_AA)
    blur = max(3, int(scale * 0.02)) | 1
    body_alpha = cv2.GaussianBlur(body, (blur * 3, blur * 3), blur).astype(np.float32) / 255

    strands = np.zeros((height, width), np.float32)
    for _ in range(max(40, scale // 3)):
        angle = rng.uniform(0, 2 * np.pi)
        x = centre[0] + axes[0] * 0.9 * np.cos(angle)
        y = centre[1] + axes[1] * 0.9 * np.sin(angle)
        heading = angle + rng.normal(0, 0.3)
        points = []
        for _ in range(int(rng.integers(10, 25))):
            points.append((x, y))
            heading += rng.normal(0, 0.15)
            step = scale * 0.012
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        canvas = np.zeros((height, width), np.uint8)
        line = (np.array(points) * 16).astype(np.int32)  # 4 fractional bits: subpixel AA
        cv2.polylines(canvas, [line], False, 255, 1, cv2.LINE_AA, shift=4)
        opacity = rng.uniform(0.4, 0.9)
        strands = np.maximum(strands, canvas.astype(np.float32) / 255 * opacity)
    alpha = np.maximum(body_alpha, strands)
    alpha8 = np.round(alpha * 255).astype(np.uint8)
    alpha = alpha8.astype(np.float32) / 255  # the image is made with the alpha the cutout has
    image = alpha[..., None] * foreground + (1 - alpha[..., None]) * background
    image8 = np.round(image * 255).astype(np.uint8)
    return Composite(image8, alpha8, foreground, background)
