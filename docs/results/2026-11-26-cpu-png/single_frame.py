"""One 1080p cutout PNG-encoded by Pillow and by FFmpeg (PyAV) per row filter: ms, bytes.

PYTHONPATH=. python docs/results/2026-11-26-cpu-png/single_frame.py
"""

import io
import time
from collections.abc import Callable

import av
import numpy as np
from PIL import Image

from segmentation_client.wire import cutout_rgba
from tests.conftest import product_frame

HEIGHT, WIDTH = 1080, 1920
frame = product_frame(WIDTH, HEIGHT, seed=3)
yy, xx = np.ogrid[0:HEIGHT, 0:WIDTH]
r = ((xx - WIDTH / 2) / (WIDTH / 4)) ** 2 + ((yy - HEIGHT / 2) / (HEIGHT / 3)) ** 2
alpha = np.clip((1.2 - r) * 600, 0, 255).astype(np.uint8)
rgba = cutout_rgba(frame, alpha)


def timed(encode: Callable[[], bytes], repeat: int = 5) -> tuple[float, int]:
    """Milliseconds per call (after one warm-up) and the size of the output."""
    out = encode()
    started = time.perf_counter()
    for _ in range(repeat):
        out = encode()
    return round((time.perf_counter() - started) / repeat * 1000, 1), len(out)


def pillow(level: int) -> Callable[[], bytes]:
    def encode() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rgba).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return encode


def ffmpeg(pred: str) -> Callable[[], bytes]:
    context = av.CodecContext.create("png", "w")
    context.width, context.height, context.pix_fmt = WIDTH, HEIGHT, "rgba"
    context.options = {"pred": pred, "compression_level": "1"}
    context.open()
    picture = av.VideoFrame.from_ndarray(rgba, format="rgba")

    def encode() -> bytes:
        return b"".join(bytes(packet) for packet in context.encode(picture))

    return encode


print("pillow l1", timed(pillow(1)), "l3", timed(pillow(3)))
for pred in ("none", "sub", "up", "paeth", "mixed"):
    print("ffmpeg png pred", pred, timed(ffmpeg(pred)))
