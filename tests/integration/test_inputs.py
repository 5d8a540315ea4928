"""Unusual but valid images, decompression bombs and deadlines, over HTTP."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import product_frame

pytestmark = pytest.mark.integration


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return _save(Image.fromarray(product_frame(80, 40)), "JPEG", exif=exif)


def _palette() -> bytes:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return _save(image, "PNG", transparency=0)


UNUSUAL: dict[str, tuple[Callable[[], bytes], tuple[int, int]]] = {
    "grayscale": (lambda: _save(Image.new("L", (33, 21), 90), "PNG"), (33, 21)),
    "16-bit": (
        lambda: _save(Image.fromarray(np.full((21, 33), 40000, np.uint16)), "PNG"),
        (33, 21),
    ),
    "palette": (_palette, (30, 20)),
    "rgba": (lambda: _save(Image.new("RGBA", (17, 9), (5, 6, 7, 100)), "PNG"), (17, 9)),
    "cmyk-jpeg": (lambda: _save(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG"), (24, 16)),
    "webp": (lambda: _save(Image.fromarray(product_frame(48, 32)), "WEBP"), (48, 32)),
    "exif-rotated": (_exif_rotated, (40, 80)),
    "1x1": (lambda: _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1)),
}


@pytest.mark.parametrize("kind", sorted(UNUSUAL))
def test_unusual_valid_images_are_served_at_their_displayed_size(
    client: httpx.Client, kind: str
) -> None:
    make, (width, height) = UNUSUAL[kind]
    data = make()
    cutout = client.post(
        "/v1/remove-background", content=data, headers={"Content-Type": "image/png"}
    )
    assert cutout.status_code == 200, cutout.text
    assert Image.open(io.BytesIO(cutout.content)).size == (width, height)
    found = client.post("/v1/segment", content=data, headers={"Content-Type": "image/png"})
    assert found.status_code == 200, found.text
    assert (found.json()["width"], found.json()["height"]) == (width, height)


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # A few KB of zeros that would inflate to width*height*3 bytes.
    pixels = zlib.compress(b"\0" * (64 * 1024), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("path", ["/v1/remove-background", "/v1/segment", "/v1/products"])
def test_decompression_bomb_is_refused_before_decoding(client: httpx.Client, path: str) -> None:
    response = client.post(
        path, content=_png_bomb(50_000, 50_000), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "50000x50000" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path", ["/v1/remove-background", "/v1/segment", "/v1/products", "/v1/frames"]
)
def test_an_expired_deadline_is_504_and_no_deadline_still_succeeds(
    client: httpx.Client, path: str
) -> None:
    """The deadline counts from the request's arrival: 1 ms expires before any model work,
    wherever the router notices it (reading, decoding or calling a model)."""
    body = _save(Image.fromarray(product_frame(64, 48)), "PNG")

    def post(headers: dict[str, str]) -> httpx.Response:
        if path == "/v1/frames":
            return client.post(
                path, files=[("frames", ("0.png", body, "image/png"))], headers=headers
            )
        return client.post(path, content=body, headers={"Content-Type": "image/png", **headers})

    expired = post({"X-Request-Timeout-Ms": "1"})
    assert expired.status_code == 504, expired.text
    assert expired.json()["error"]["code"] == "deadline_exceeded"
    assert "deadline" in expired.json()["error"]["message"]
    relaxed = post({})
    assert relaxed.status_code == 200, relaxed.text
    generous = post({"X-Request-Timeout-Ms": "60000"})
    assert generous.status_code == 200, generous.text
