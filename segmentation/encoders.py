"""Output encoders shared by the HTTP layer, the client and the video tools."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

#: zlib level for PNG: 1 is several times faster than the default 6 at a few % more bytes;
#: PNG encoding is on the response path of every background-removal request.
PNG_COMPRESS_LEVEL = 1


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _check_matte(frame: np.ndarray, alpha: np.ndarray) -> None:
    if frame.shape[:2] != alpha.shape:
        raise ValueError(f"alpha {alpha.shape} does not match frame {frame.shape[:2]}")


def cutout_rgba(frame: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 ``HxWx4``: the RGB ``frame`` with ``alpha`` as its alpha channel.

    Fully transparent pixels (alpha 0) are stored as ``(0, 0, 0, 0)``: they are invisible,
    and a 1080p cutout then encodes to PNG about 5x faster and 100x smaller than with the
    background's pixels kept under them. Callers who need the original pixels there ask for
    the matte (``output=mask``) and compose it themselves.
    """
    _check_matte(frame, alpha)
    visible = cv2.bitwise_and(frame, frame, mask=alpha)  # cv2 releases the GIL
    return cv2.merge((visible[..., 0], visible[..., 1], visible[..., 2], alpha))


def rgba_png(frame: np.ndarray, alpha: np.ndarray) -> bytes:
    """PNG of :func:`cutout_rgba` (the frame's pixels where the matte is not 0)."""
    return _png(Image.fromarray(cutout_rgba(frame, alpha), mode="RGBA"))


def mask_png(alpha: np.ndarray) -> bytes:
    """Grayscale (mode L) PNG of a uint8 matte."""
    return _png(Image.fromarray(np.ascontiguousarray(alpha, dtype=np.uint8), mode="L"))


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


def jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    """JPEG of a uint8 RGB array or a PIL image (converted to RGB)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
