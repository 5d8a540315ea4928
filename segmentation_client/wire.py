"""The wire format: COCO RLE masks, uint8 mattes, RGBA cutouts, JPEG uploads.

numpy, Pillow and pycocotools only, so the client stays light; the library and the service use the
same functions, so a mask means the same thing on both ends of the wire.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a binary ``HxW`` mask as JSON-ready ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_rle`: a uint8 ``HxW`` mask of 0 and 1."""
    counts = rle["counts"]
    coco = {
        "size": list(rle["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }
    return np.ascontiguousarray(mask_utils.decode(coco))


def union_matte(height: int, width: int, rles: Iterable[dict[str, Any]]) -> np.ndarray:
    """uint8 ``HxW`` matte: 255 where any of the RLE masks is, 0 elsewhere."""
    union = np.zeros((height, width), dtype=np.uint8)
    for rle in rles:
        union[decode_rle(rle).astype(bool)] = 255
    return union


def cutout_rgba(frame: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 ``HxWx4``: the RGB ``frame`` with ``alpha`` as its alpha channel.

    Fully transparent pixels (alpha 0) are stored as ``(0, 0, 0, 0)``: they are invisible,
    and a 1080p cutout then encodes to PNG about 5x faster and 100x smaller than with the
    background's pixels kept under them. Callers who need the original pixels there ask for
    the matte (``output=mask``) and compose it themselves.
    """
    if frame.shape[:2] != alpha.shape:
        raise ValueError(f"alpha {alpha.shape} does not match frame {frame.shape[:2]}")
    rgba = np.empty((*alpha.shape, 4), dtype=np.uint8)
    rgba[..., :3] = frame
    rgba[..., 3] = alpha
    # Each pixel as one uint32, zeroed where alpha is 0: half the time of zeroing the three
    # strided colour channels (10 vs 20 ms a 1080p frame).
    pixels = rgba.view(np.uint32)
    np.multiply(pixels, (alpha > 0)[..., None], out=pixels, casting="unsafe")
    return rgba


def jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    """JPEG of a uint8 RGB array or a PIL image (converted to RGB)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
