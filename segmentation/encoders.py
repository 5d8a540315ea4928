"""Image encoders of the service's answers: PNG cutouts and mattes, JPEG, base64.

PNGs are written by OpenCV (libpng), not Pillow, for two measured reasons
(``benchmarks/encode_bench.py``, 1080p synthetic product shots, see docs/benchmarks.md):

- OpenCV's calls run outside the interpreter lock, so the router's codec threads encode on
  every core at once; Pillow's PNG encoder holds the lock and a router process encodes on
  one core however many threads it has.
- zlib level 1 with the run-length strategy and the Up filter is 2-3x faster per frame than
  Pillow's level 1 (adaptive filters, default strategy) and 11-22% smaller: a product cutout's
  transparent background is long runs of zero bytes, and Up turns the still parts of
  the product into zeros too. (Level makes no difference under the run-length strategy.)

The output is an ordinary 8-bit RGBA (or grayscale) PNG: lossless, decoded by any reader to
exactly the pixels of :func:`cutout_rgba` (tests/unit/test_encoders.py checks the round trip).
"""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
from PIL import Image

from segmentation.options import CutoutOptions
from segmentation_client.wire import cutout_rgba, decode_rle, encode_rle, jpeg, union_matte

__all__ = [
    "b64",
    "cutout_bgra",
    "cutout_png",
    "cutout_rgba",
    "decode_rle",
    "encode_pixels",
    "encode_rle",
    "jpeg",
    "mask_png",
    "rgba_png",
    "union_matte",
]

#: zlib level for PNG: 1 is several times faster than the default 6 at a few % more bytes;
#: PNG encoding is on the response path of every background-removal request.
PNG_COMPRESS_LEVEL = 1
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    PNG_COMPRESS_LEVEL,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_UP,
]
# RGB frame channels 0, 1, 2 and the matte (channel 3 of the pair) into B, G, R, A.
_RGB_ALPHA_TO_BGRA = [0, 2, 1, 1, 2, 0, 3, 3]


def cutout_bgra(frame: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """:func:`cutout_rgba` in OpenCV's BGRA channel order, composed by OpenCV (off the
    interpreter lock, and about 5x faster than NumPy's strided multiply into a channel)."""
    if frame.shape[:2] != alpha.shape:
        raise ValueError(f"alpha {alpha.shape} does not match frame {frame.shape[:2]}")
    alpha = np.ascontiguousarray(alpha, dtype=np.uint8)
    _, visible = cv2.threshold(alpha, 0, 255, cv2.THRESH_BINARY)
    shown = cv2.bitwise_and(frame, frame, mask=visible)
    bgra = np.empty((*alpha.shape, 4), dtype=np.uint8)
    cv2.mixChannels([shown, alpha], [bgra], _RGB_ALPHA_TO_BGRA)
    return bgra


def _png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels, _PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"PNG encoding of a {pixels.shape} {pixels.dtype} array failed")
    return data.tobytes()


def rgba_png(frame: np.ndarray, alpha: np.ndarray) -> bytes:
    """RGBA PNG of :func:`cutout_rgba` (the frame's pixels where the matte is not 0)."""
    return _png(cutout_bgra(frame, alpha))


def cutout_png(rgba: np.ndarray) -> bytes:
    """PNG of an ``HxWx4`` RGBA cutout composed already (on the model's device)."""
    return _png(cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2BGRA))


def mask_png(alpha: np.ndarray) -> bytes:
    """Grayscale (mode L) PNG of a uint8 matte."""
    return _png(np.ascontiguousarray(alpha, dtype=np.uint8))


#: libwebp effort (0 fastest - 6 smallest). Lossy at 2: on 1080p product cutouts as small
#: as 4 and about 40% faster; lossless at 1 with quality 0: 8x smaller than method 0 (which
#: was larger than the PNG) at a fraction of the default's time (benchmarks/refine_bench.py).
WEBP_LOSSY_METHOD = 2
WEBP_LOSSLESS_METHOD = 1
_TO_BGR = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}


def encode_pixels(pixels: np.ndarray, options: CutoutOptions) -> bytes:
    """``HxWxC`` uint8 pixels (C 1: a matte, 3: RGB, 4: RGBA) in ``options.format``: PNG and
    JPEG by OpenCV (off the interpreter lock), WebP by Pillow (lossy with alpha, or
    lossless)."""
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    flat = pixels.reshape(pixels.shape[:2]) if channels == 1 else pixels
    if options.format == "webp":
        buffer = io.BytesIO()
        image = Image.fromarray(np.ascontiguousarray(flat))
        if options.lossless:
            image.save(
                buffer,
                format="WEBP",
                lossless=True,
                quality=0,
                method=WEBP_LOSSLESS_METHOD,
                exact=True,  # keep every pixel's colour, transparent ones included
            )
        else:
            image.save(buffer, format="WEBP", quality=options.quality, method=WEBP_LOSSY_METHOD)
        return buffer.getvalue()
    ordered = cv2.cvtColor(flat, _TO_BGR[channels]) if channels in _TO_BGR else flat
    if options.format == "jpeg":
        ok, data = cv2.imencode(".jpg", ordered, [cv2.IMWRITE_JPEG_QUALITY, options.quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding of a {pixels.shape} array failed")
        return bytes(data.tobytes())
    return _png(np.ascontiguousarray(ordered))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
