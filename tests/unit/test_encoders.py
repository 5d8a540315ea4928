import io

import numpy as np
import pytest
from PIL import Image

from segmentation.encoders import (
    compose_rgba,
    cutout_png,
    cutout_rgba,
    decode_rle,
    encode_rle,
    mask_png,
    png,
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


def test_compose_rgba_is_cutout_rgba() -> None:
    frame, alpha = _product_shot(6)
    assert np.array_equal(compose_rgba(frame, alpha), cutout_rgba(frame, alpha))


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((1, 1), "L"), ((7, 5), "L"), ((1, 9, 3), "RGB"), ((33, 17, 3), "RGB"), ((5, 1, 4), "RGBA")],
)
def test_png_of_any_bytes_decodes_to_them_in_pillow_and_opencv(
    shape: tuple[int, ...], mode: str
) -> None:
    """Random bytes (the Up filter's differences wrap around 256 in both directions), one
    row, one column, each colour type; read back by Pillow and by OpenCV (libpng)."""
    import cv2

    pixels = np.random.default_rng(len(shape) * 10 + shape[0]).integers(
        0, 256, shape, dtype=np.uint8
    )
    data = png(pixels)
    assert np.array_equal(_decoded(data, mode, (shape[1], shape[0])), pixels)
    read = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if read.ndim == 3:
        read = read[..., [2, 1, 0, 3][: read.shape[2]]]
    assert np.array_equal(read, pixels)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((0, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4), np.float32)],
    ids=["empty", "five-channels", "float"],
)
def test_png_refuses_what_it_cannot_hold(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="PNG"):
        png(pixels)


def test_cutout_png_of_a_strided_rgba_view_is_lossless() -> None:
    frame, alpha = _product_shot(8)
    rgba = cutout_rgba(frame, alpha)[::2, 1::3]
    assert not rgba.flags.c_contiguous
    assert np.array_equal(_decoded(cutout_png(rgba), "RGBA", (rgba.shape[1], rgba.shape[0])), rgba)


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
