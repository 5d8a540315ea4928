import io

import numpy as np
import pytest
from PIL import Image

from segmentation.encoders import decode_rle, encode_rle, mask_png, rgba_png
from tests.conftest import product_frame


def test_rgba_png_carries_frame_and_alpha() -> None:
    frame = product_frame(30, 20)
    alpha = np.arange(600, dtype=np.uint32).reshape(20, 30).astype(np.uint8)
    image = Image.open(io.BytesIO(rgba_png(frame, alpha)))
    assert image.format == "PNG" and image.mode == "RGBA" and image.size == (30, 20)
    pixels = np.asarray(image)
    assert (pixels[..., 3] == alpha).all()
    hidden = alpha == 0
    assert hidden.sum() == 3  # 0, 256 and 512 wrap to 0
    assert (pixels[~hidden][:, :3] == frame[~hidden]).all()  # visible: the frame's pixels
    assert (pixels[hidden] == 0).all()  # fully transparent: stored black


def test_rgba_png_rejects_mismatched_alpha() -> None:
    with pytest.raises(ValueError, match="does not match"):
        rgba_png(product_frame(30, 20), np.zeros((10, 10), np.uint8))


def test_mask_png_is_grayscale() -> None:
    alpha = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    image = Image.open(io.BytesIO(mask_png(alpha)))
    assert image.mode == "L" and (np.asarray(image) == alpha).all()


def test_rle_round_trip() -> None:
    rng = np.random.default_rng(3)
    mask = (rng.random((37, 53)) > 0.6).astype(np.uint8)
    rle = encode_rle(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert (decode_rle(rle) == mask).all()
