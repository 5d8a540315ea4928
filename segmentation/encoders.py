"""Image encoders of the service's answers: PNG cutouts and mattes, JPEG, base64.

PNGs are written here (:func:`png`): every row Up-filtered by NumPy (a row minus the one above
it: a still background and the transparent area become runs of zeros) and the rows deflated
by ISA-L (Intel's Intelligent Storage Acceleration Library, ``isal``) at level 1. Measured
(``benchmarks/encode_bench.py``, 1080p synthetic product shots, one core, see
docs/benchmarks.md) against the OpenCV (libpng, zlib level 1, run-length strategy, Up filter)
encoder used before: 3.6-4.2x faster a cutout, 5-18% larger. The filter and the deflate run
outside the interpreter lock (NumPy's loops and ISA-L release it; the chunks' framing does
not: a Python thread beside an encode kept 0.72-0.96 of its pace), so a replica's codec
threads encode on every core at once. A GPU replica answering RMBG-2.0's cutouts spends
most of its CPU here.

The output is an ordinary 8-bit PNG (greyscale, RGB or RGBA), lossless: any reader decodes
exactly the pixels of :func:`cutout_rgba` (tests/unit/test_encoders.py checks the round trip).
"""

from __future__ import annotations

import base64
import io
import struct

import cv2
import numpy as np
from isal import isal_zlib
from PIL import Image

from segmentation.options import CutoutOptions
from segmentation_client.wire import cutout_rgba, decode_rle, encode_rle, jpeg, union_matte

__all__ = [
    "b64",
    "compose_rgba",
    "cutout_png",
    "cutout_rgba",
    "decode_rle",
    "encode_pixels",
    "encode_rle",
    "jpeg",
    "mask_png",
    "png",
    "rgba_png",
    "union_matte",
]

#: ISA-L's deflate level for PNG (0-3): on 1080p cutouts 1 was as fast as 0, whose output is
#: 42-67% larger, and as 2, whose output was no smaller (docs/benchmarks.md).
PNG_COMPRESS_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type by channels: greyscale, greyscale + alpha, RGB, RGBA.
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}
_UP = 2  # PNG's filter type: each byte minus the byte above it
# RGB frame channels 0, 1, 2 and the matte (channel 3 of the pair) into R, G, B, A.
_RGB_ALPHA_TO_RGBA = [0, 0, 1, 1, 2, 2, 3, 3]


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(pixels: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """An 8-bit PNG of ``HxW`` or ``HxWxC`` uint8 pixels (C 1-4: grey, grey + alpha, RGB,
    RGBA), each row Up-filtered and the whole deflated by ISA-L at ``level`` (see the
    module's docstring)."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"PNG needs HxW or HxWxC uint8 pixels, not {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if height == 0 or width == 0 or channels not in _COLOUR_TYPE:
        raise ValueError(f"PNG cannot hold an image of shape {pixels.shape}")
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = _UP  # the first row's "row above" is zeros: its bytes go as they are
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG's Up is
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", isal_zlib.compress(filtered, level)),
            _chunk(b"IEND", b""),
        )
    )


def compose_rgba(frame: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """:func:`cutout_rgba` composed by OpenCV (off the interpreter lock, and about 5x faster
    than NumPy's strided multiply into a channel)."""
    if frame.shape[:2] != alpha.shape:
        raise ValueError(f"alpha {alpha.shape} does not match frame {frame.shape[:2]}")
    alpha = np.ascontiguousarray(alpha, dtype=np.uint8)
    _, visible = cv2.threshold(alpha, 0, 255, cv2.THRESH_BINARY)
    shown = cv2.bitwise_and(frame, frame, mask=visible)
    rgba = np.empty((*alpha.shape, 4), dtype=np.uint8)
    cv2.mixChannels([shown, alpha], [rgba], _RGB_ALPHA_TO_RGBA)
    return rgba


def rgba_png(frame: np.ndarray, alpha: np.ndarray) -> bytes:
    """RGBA PNG of :func:`cutout_rgba` (the frame's pixels where the matte is not 0)."""
    return png(compose_rgba(frame, alpha))


def cutout_png(rgba: np.ndarray) -> bytes:
    """PNG of an ``HxWx4`` RGBA cutout composed already (on the model's device)."""
    return png(rgba)


def mask_png(alpha: np.ndarray) -> bytes:
    """Grayscale (mode L) PNG of a uint8 matte."""
    return png(np.asarray(alpha, dtype=np.uint8))


#: libwebp effort (0 fastest - 6 smallest). Lossy at 2: on 1080p product cutouts as small
#: as 4 and about 40% faster; lossless at 1 with quality 0: 8x smaller than method 0 (which
#: was larger than the PNG) at a fraction of the default's time (benchmarks/refine_bench.py).
WEBP_LOSSY_METHOD = 2
WEBP_LOSSLESS_METHOD = 1
_TO_BGR = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}


def encode_pixels(pixels: np.ndarray, options: CutoutOptions) -> bytes:
    """``HxWxC`` uint8 pixels (C 1: a matte, 3: RGB, 4: RGBA) in ``options.format``: PNG by
    :func:`png`, JPEG by OpenCV (both off the interpreter lock), WebP by Pillow (lossy with
    alpha, or lossless)."""
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
    if options.format == "jpeg":
        ordered = cv2.cvtColor(flat, _TO_BGR[channels]) if channels in _TO_BGR else flat
        ok, data = cv2.imencode(".jpg", ordered, [cv2.IMWRITE_JPEG_QUALITY, options.quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding of a {pixels.shape} array failed")
        return bytes(data.tobytes())
    return png(flat)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
