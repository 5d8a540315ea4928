import io

import numpy as np
import pytest
from PIL import Image

from segmentation.encoders import (
    cutout_bgra,
    cutout_rgba,
    decode_rle,
    encode_rle,
    mask_png,
    rgba_png,
)
from segmentation_standins import synthetic
from tests.conftest import product_frame


def _decoded(data: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == mode and image.size == size
    return np.asarray(image)


def _product_shot(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic product shot and its soft matte quantised as RMBG-2.0's is."""
    shot = synthetic.scene(seed, 0, width=160, height=120)
    return shot.image, np.round(shot.alpha * 255.0).astype(np.uint8)


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


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rgba_png_of_a_product_shot_decodes_to_exactly_the_cutout(seed: int) -> None:
    frame, alpha = _product_shot(seed)
    hidden = alpha == 0
    assert 0 < hidden.mean() < 1 and ((alpha > 0) & (alpha < 255)).any()  # soft edges
    pixels = _decoded(rgba_png(frame, alpha), "RGBA", (160, 120))
    assert np.array_equal(pixels, cutout_rgba(frame, alpha))
    assert np.array_equal(pixels[~hidden][:, :3], frame[~hidden])


def test_rgba_png_of_random_pixels_and_matte_is_lossless() -> None:
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, size=(67, 91, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, size=(67, 91), dtype=np.uint8)
    pixels = _decoded(rgba_png(frame, alpha), "RGBA", (91, 67))
    assert np.array_equal(pixels, cutout_rgba(frame, alpha))


def test_rgba_png_of_a_crop_view_encodes_the_crop() -> None:
    # /v1/products encodes crops that are views into the frame (rows not contiguous).
    frame, alpha = _product_shot(4)
    crop = frame[10:90, 20:130]
    assert not crop.flags.c_contiguous
    pixels = _decoded(rgba_png(crop, alpha[10:90, 20:130]), "RGBA", (110, 80))
    assert np.array_equal(pixels, cutout_rgba(np.ascontiguousarray(crop), alpha[10:90, 20:130]))


def test_cutout_bgra_is_cutout_rgba_in_opencv_order() -> None:
    frame, alpha = _product_shot(6)
    assert np.array_equal(cutout_bgra(frame, alpha), cutout_rgba(frame, alpha)[..., [2, 1, 0, 3]])


@pytest.mark.parametrize("seed", [1, 7])
def test_mask_png_of_a_product_matte_is_lossless(seed: int) -> None:
    _, alpha = _product_shot(seed)
    assert np.array_equal(_decoded(mask_png(alpha), "L", (160, 120)), alpha)


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
