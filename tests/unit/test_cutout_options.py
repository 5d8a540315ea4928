"""Cutout options: parsing, validation, composition on the device and encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.compose import compose, fit_size
from segmentation.encoders import encode_pixels
from segmentation.errors import InvalidRequestError
from segmentation.options import (
    CutoutOptions,
    margin_region,
    output_pixels_bound,
    parse_bool,
    parse_color,
    parse_margin,
)
from segmentation_client.wire import cutout_rgba


def _scene() -> tuple[np.ndarray, np.ndarray]:
    frame = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    matte = np.zeros((60, 80), np.uint8)
    matte[20:40, 30:50] = 255
    matte[20, 30:50] = 128  # a soft top edge
    return frame, matte


def _compose(options: CutoutOptions) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    frame, matte = _scene()
    out = compose(torch.from_numpy(frame).permute(2, 0, 1), torch.from_numpy(matte), options)
    return out.pixels, out.subject


@pytest.mark.parametrize(
    ("text", "rgba"),
    [
        ("81d4fa", (0x81, 0xD4, 0xFA, 255)),
        ("#fff", (255, 255, 255, 255)),
        ("81d4fa77", (0x81, 0xD4, 0xFA, 0x77)),
        ("f008", (255, 0, 0, 0x88)),
        ("green", (0, 128, 0, 255)),
        ("255,0,0", (255, 0, 0, 255)),
        ("0, 0, 255, 128", (0, 0, 255, 128)),
    ],
)
def test_colours_are_read_as_people_write_them(text: str, rgba: tuple[int, ...]) -> None:
    assert parse_color(text) == rgba


@pytest.mark.parametrize(
    "text", ["", "nocolour", "12345", "#ggg", "256,0,0", "1,2", "1,\u00b2,3", "\u0661,2,3"]
)  # only ASCII digits: str.isdigit takes a superscript two, which int() refuses
def test_a_bad_colour_is_refused_with_what_is_accepted(text: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"hex|r,g,b"):
        parse_color(text)


def test_margins_take_one_two_or_four_values_in_pixels_or_percent() -> None:
    assert parse_margin("30px") == ((30.0, False),) * 4
    assert parse_margin("10%") == ((0.1, True),) * 4
    assert parse_margin("5 10%") == ((5.0, False), (0.1, True), (5.0, False), (0.1, True))
    assert parse_margin("1px 2px 3px 4px")[3] == (4.0, False)
    for bad in ("-3px", "abc", "1 2 3", "nan"):
        with pytest.raises(InvalidRequestError, match="crop_margin"):
            parse_margin(bad)


def test_booleans_accept_the_usual_spellings() -> None:
    assert parse_bool("crop", "TRUE") and parse_bool("crop", "1") and not parse_bool("crop", "off")
    with pytest.raises(InvalidRequestError, match="crop='maybe'"):
        parse_bool("crop", "maybe")


def test_invalid_combinations_name_every_problem() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        CutoutOptions(format="jpeg", lossless=True, quality=0)
    message = str(caught.value)
    assert "lossless applies to format=webp" in message
    assert "quality=0" in message
    assert "format=jpeg has no alpha channel" in message
    with pytest.raises(InvalidRequestError, match="apply to output=rgba"):
        CutoutOptions(output="mask", refine=True)


def test_default_options_compose_the_plain_cutout() -> None:
    frame, matte = _scene()
    pixels, subject = _compose(CutoutOptions())
    assert np.array_equal(pixels, cutout_rgba(frame, matte))
    assert subject == (30, 20, 50, 40)


def test_crop_cuts_to_the_subject_and_a_margin_past_the_edge_is_transparent() -> None:
    frame, _ = _scene()
    pixels, _ = _compose(CutoutOptions(crop=True))
    assert pixels.shape == (20, 20, 4)
    assert np.array_equal(pixels[1:, :, :3], frame[21:40, 30:50])
    wide, _ = _compose(CutoutOptions(crop=True, crop_margin=parse_margin("25px")))
    assert wide.shape == (70, 70, 4)  # 20 + 2 x 25; 5 rows above the frame's top
    assert not wide[:5].any()
    assert np.array_equal(wide[26:45, 25:45, :3], frame[21:40, 30:50])


def test_an_opaque_background_gives_rgb_with_the_soft_edge_blended() -> None:
    frame, _ = _scene()
    pixels, _ = _compose(CutoutOptions(background=(0, 0, 255, 255)))
    assert pixels.shape == (60, 80, 3)
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert np.array_equal(pixels[30, 40], frame[30, 40])
    blend = frame[20, 35].astype(float) * 128 / 255 + np.array([0, 0, 255]) * 127 / 255
    assert np.abs(pixels[20, 35].astype(float) - blend).max() <= 1


def test_a_translucent_background_keeps_an_alpha_channel() -> None:
    pixels, _ = _compose(CutoutOptions(background=(255, 0, 0, 128)))
    assert pixels.shape == (60, 80, 4)
    assert tuple(pixels[0, 0]) == (255, 0, 0, 128)
    assert pixels[30, 40, 3] == 255


def test_max_pixels_scales_down_with_the_aspect_kept() -> None:
    assert fit_size(1080, 1920, 250_000) == (375, 666)
    pixels, _ = _compose(CutoutOptions(max_pixels=1200))
    assert pixels.shape == (30, 40, 4)


def test_a_mask_can_be_cropped_and_a_cleaned_matte_is_hard() -> None:
    pixels, _ = _compose(CutoutOptions(output="mask", crop=True, clean_matte=True))
    assert pixels.shape[2] == 1
    assert set(np.unique(pixels)) <= {0, 255}


def test_an_empty_matte_has_no_subject_and_crop_keeps_the_frame() -> None:
    frame, _ = _scene()
    out = compose(
        torch.from_numpy(frame).permute(2, 0, 1),
        torch.zeros((60, 80), dtype=torch.uint8),
        CutoutOptions(crop=True),
    )
    assert out.subject is None and out.pixels.shape == (60, 80, 4)


def test_the_output_pixel_bound_of_a_frame() -> None:
    full = CutoutOptions(crop=True, crop_margin=parse_margin("100%"))
    assert output_pixels_bound(1000, 800, CutoutOptions()) == 800_000
    assert output_pixels_bound(1000, 800, full) == 2000 * 1800  # 500 px a side: 1800, not 1600
    assert output_pixels_bound(4000, 3000, full) == 8000 * 6000  # half the subject a side
    assert output_pixels_bound(100, 100, CutoutOptions(crop=True)) == 100 * 100
    tiny = CutoutOptions(crop=True, crop_margin=parse_margin("1000px"))
    assert output_pixels_bound(100, 100, tiny) == 1100 * 1100  # 500 px, more than half of 100
    assert output_pixels_bound(1000, 800, CutoutOptions(max_pixels=250_000)) == 250_000
    assert output_pixels_bound(100, 100, CutoutOptions(max_pixels=250_000)) == 10_000


@pytest.mark.parametrize(
    "options",
    [
        CutoutOptions(),
        CutoutOptions(crop=True),
        CutoutOptions(crop=True, crop_margin=parse_margin("3px 40% 0 2")),
        CutoutOptions(crop=True, crop_margin=parse_margin("600px")),
        CutoutOptions(crop=True, crop_margin=parse_margin("50%"), max_pixels=40),
        CutoutOptions(max_pixels=5),
        CutoutOptions(crop=True, crop_margin=parse_margin("1px"), max_pixels=3),
    ],
)
@pytest.mark.parametrize(("width", "height"), [(9, 6), (1, 12), (31, 2)])
def test_no_subject_gives_an_output_over_the_bound(
    options: CutoutOptions, width: int, height: int
) -> None:
    """Every box a subject can have in the frame, and none: the region it gives, scaled as
    compose scales it."""
    bound = output_pixels_bound(width, height, options)
    boxes = [
        (left, top, right, bottom)
        for left in range(width)
        for right in range(left + 1, width + 1)
        for top in range(height)
        for bottom in range(top + 1, height + 1)
    ]
    largest = 0
    for box in [*boxes, None]:
        region = (0, 0, width, height)
        if options.crop and box is not None:
            region = margin_region(box, options.crop_margin)
        size = fit_size(region[3] - region[1], region[2] - region[0], options.max_pixels)
        largest = max(largest, size[0] * size[1])
    assert largest <= bound
    if options.max_pixels is None:
        assert largest == bound


@pytest.mark.parametrize(
    ("options", "fmt", "mode"),
    [
        (CutoutOptions(), "PNG", "RGBA"),
        (CutoutOptions(format="webp"), "WEBP", "RGBA"),
        (CutoutOptions(format="webp", lossless=True), "WEBP", "RGBA"),
        (CutoutOptions(format="jpeg", background=(255, 255, 255, 255)), "JPEG", "RGB"),
        (CutoutOptions(format="png", background=(255, 255, 255, 255)), "PNG", "RGB"),
        (CutoutOptions(output="mask", format="webp", lossless=True), "WEBP", "RGB"),
    ],
)
def test_each_format_decodes_to_the_composed_pixels(
    options: CutoutOptions, fmt: str, mode: str
) -> None:
    pixels, _ = _compose(options)
    image = Image.open(io.BytesIO(encode_pixels(pixels, options)))
    assert (image.format, image.mode) == (fmt, mode)
    decoded = np.asarray(image)
    expected = pixels[..., 0] if pixels.shape[2] == 1 else pixels
    if decoded.ndim == 3 and expected.ndim == 2:
        decoded = decoded[..., 0]
    if options.format == "png" or options.lossless:
        assert np.array_equal(decoded, expected)
    else:  # lossy, of a frame of random noise: close on average only
        assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 32


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (2, 3)])
def test_every_option_works_on_the_smallest_images(size: tuple[int, int]) -> None:
    frame = torch.full((3, *size), 200, dtype=torch.uint8)
    matte = torch.full(size, 128, dtype=torch.uint8)
    options = CutoutOptions(
        refine=True,
        background=(0, 0, 0, 128),
        crop=True,
        crop_margin=parse_margin("2px"),
        clean_matte=True,
        max_pixels=1,
        format="webp",
    )
    out = compose(frame, matte, options)
    assert out.pixels.shape == (1, 1, 4)
    assert Image.open(io.BytesIO(encode_pixels(out.pixels, options))).size == (1, 1)
