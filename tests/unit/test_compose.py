"""Composing cutouts: the foreground's box in the answered image, and a crop's margin past the
frame's edge added at the end, in uint8, with the same pixels as padding the region first."""

from __future__ import annotations

import dataclasses
import math
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segmentation.compose as compose_module
from segmentation.compose import (
    Box,
    clean_matte,
    compose,
    compose_on_device,
    fit_size,
    plain_cutout,
    subject_box,
)
from segmentation.options import CutoutOptions, margin_region, parse_margin
from segmentation.refine import estimate_foreground


# -- the algorithm as it was: the region padded first, every step on the padded size --------
def _padded(image: torch.Tensor, region: Box) -> torch.Tensor:
    left, top, right, bottom = region
    height, width = image.shape[-2:]
    inside = image[:, max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    pads = (max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0))
    return F.pad(inside, pads) if any(pads) else inside


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def _over(rgb: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> torch.Tensor:
    alpha = matte.float()[None] / 255
    colour = rgb.float() / 255
    if options.refine:
        colour = estimate_foreground(colour, alpha)
    if options.background is None:
        out_alpha = alpha
        out = colour * (alpha > 0)
    else:
        red, green, blue, opacity = options.background
        back = torch.tensor([red, green, blue], device=colour.device, dtype=colour.dtype)
        back = (back / 255).view(3, 1, 1)
        back_alpha = opacity / 255
        out_alpha = alpha + back_alpha * (1 - alpha)
        out = (colour * alpha + back * back_alpha * (1 - alpha)) / out_alpha.clamp(min=1e-6)
        out = out * (out_alpha > 0)
    channels = [out]
    if options.channels == 4:
        channels.append(out_alpha)
    stacked = torch.cat(channels).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if options.channels == 4 and options.background is None:
        stacked[3] = matte
    return stacked.permute(1, 2, 0)


def padded_first(rgb: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> np.ndarray:
    if options.clean_matte:
        matte = clean_matte(matte)
    subject = subject_box(matte)
    if options.crop and subject is not None:
        region = margin_region(subject, options.crop_margin)
        rgb, matte = _padded(rgb, region), _padded(matte[None], region)[0]
    size = fit_size(int(matte.shape[0]), int(matte.shape[1]), options.max_pixels)
    if size != tuple(matte.shape):
        rgb, matte = _resized(rgb, size), _resized(matte[None], size)[0]
    if options.output == "mask":
        pixels = matte[..., None]
    elif not options.refine and options.background is None:
        pixels = plain_cutout(rgb, matte)
    else:
        pixels = _over(rgb, matte, options)
    return np.ascontiguousarray(pixels.cpu().numpy())


# -- scenes -------------------------------------------------------------------------------
def scene(
    seed: int, height: int, width: int, near: str = "centre"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels and a soft matte: a blob with a feathered edge, some specks, placed in the
    middle or against the frame's edges (``near``: any of "top", "left", "bottom", "right")."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    centre_row = 0.0 if "top" in near else height - 1.0 if "bottom" in near else height / 2
    centre_col = 0.0 if "left" in near else width - 1.0 if "right" in near else width / 2
    distance = np.hypot((rows - centre_row) / height, (cols - centre_col) / width)
    matte = np.clip((0.35 - distance) * 255 / 0.1, 0, 255)
    matte[rng.random((height, width)) < 0.01] = rng.integers(1, 256)
    return torch.from_numpy(frame), torch.from_numpy(matte.round().astype(np.uint8))


def alpha_box(alpha: np.ndarray) -> Box | None:
    rows, cols = np.nonzero(alpha)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


WHITE = (255, 255, 255, 255)
BACKGROUNDS = [None, (20, 200, 90, 255), (255, 0, 0, 128), (10, 20, 30, 0)]
MARGINS = ["0", "6px", "40%", "80px", "5px 70px 0 30%", "300px"]
PLACES = ["centre", "top left", "bottom right", "top", "right"]


def _cases() -> list[CutoutOptions]:
    margins = [parse_margin(text) for text in MARGINS]
    cases = [
        CutoutOptions(crop=True, crop_margin=margin, background=background)
        for margin, background in product(margins, BACKGROUNDS)
    ]
    refined = [*product(margins[1:4:2], BACKGROUNDS), *product(margins[-1:], BACKGROUNDS[::2])]
    cases += [
        CutoutOptions(
            crop=True,
            crop_margin=margin,
            refine=True,
            background=background,
            clean_matte=bool(i % 2),
        )
        for i, (margin, background) in enumerate(refined)
    ]
    cases += [
        CutoutOptions(output="mask", crop=True, crop_margin=margin, clean_matte=bool(i % 2))
        for i, margin in enumerate(margins)
    ]
    cases += [
        CutoutOptions(
            crop=True,
            crop_margin=margin,
            refine=refine,
            background=background,
            max_pixels=(400, 3000)[i % 2],
        )
        for i, (margin, refine, background) in enumerate(
            product(margins[:4:2] + margins[3:4], [False, True], BACKGROUNDS[:3])
        )
    ]
    cases += [CutoutOptions(refine=True, background=BACKGROUNDS[2]), CutoutOptions(output="mask")]
    return cases


def _label(options: CutoutOptions) -> str:
    """A short test id: the options that differ from the defaults."""
    words: list[str] = [options.output]
    if options.crop:
        words.append(
            "crop " + " ".join(f"{v * 100:g}%" if r else f"{v:g}px" for v, r in options.crop_margin)
        )
    words += ["refine"] * options.refine + ["clean"] * options.clean_matte
    if options.background is not None:
        words.append("on " + ",".join(map(str, options.background)))
    if options.max_pixels is not None:
        words.append(f"max {options.max_pixels}")
    return " ".join(words)


@pytest.mark.parametrize("options", _cases(), ids=_label)
@pytest.mark.parametrize("place", PLACES)
def test_composing_gives_bitwise_what_padding_the_region_first_gave(
    options: CutoutOptions, place: str
) -> None:
    rgb, matte = scene(len(place), 47, 61, place)
    expected = padded_first(rgb, matte, options)
    out = compose(rgb, matte, options)
    assert out.pixels.shape == expected.shape
    assert np.array_equal(out.pixels, expected)


def test_an_empty_matte_composes_as_before() -> None:
    rgb, _ = scene(3, 30, 40)
    empty = torch.zeros((30, 40), dtype=torch.uint8)
    for options in _cases()[::7]:
        assert np.array_equal(
            compose(rgb, empty, options).pixels, padded_first(rgb, empty, options)
        )


def test_the_float_steps_see_the_frames_part_of_the_region_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full-frame subject and the largest margin: the region is 3x3 frames here (500 px a
    side on 250); refinement sees the frame and the band its windows reach past the edge,
    compositing the frame alone."""
    rgb, _ = scene(5, 250, 250)
    matte = torch.full((250, 250), 200, dtype=torch.uint8)
    options = CutoutOptions(
        crop=True, crop_margin=parse_margin("100%"), refine=True, background=(9, 9, 9, 99)
    )
    seen: dict[str, list[tuple[int, ...]]] = {"refine": [], "compose": []}

    def refine(image: torch.Tensor, alpha: torch.Tensor, **kwargs: int) -> torch.Tensor:
        seen["refine"].append(tuple(image.shape))
        return estimate_foreground(image, alpha, **kwargs)

    composed = compose_module._composed

    def over(colour: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> torch.Tensor:
        seen["compose"].append(tuple(colour.shape))
        return composed(colour, matte, options)

    monkeypatch.setattr(compose_module, "estimate_foreground", refine)
    monkeypatch.setattr(compose_module, "_composed", over)
    out = compose(rgb, matte, options)
    monkeypatch.undo()
    assert out.pixels.shape == (750, 750, 4)
    band = round(750 / 8)  # the wide window
    assert seen["refine"] == [(3, 250 + 2 * band, 250 + 2 * band)]
    assert (3, 250, 250) in seen["compose"] and all(s[-1] <= 250 for s in seen["compose"])
    assert np.array_equal(out.pixels, padded_first(rgb, matte, options))


def test_past_the_edge_is_the_background_composed_over_nothing() -> None:
    rgb, matte = scene(7, 40, 40)
    margin = parse_margin("30px")
    clear = compose(rgb, matte, CutoutOptions(crop=True, crop_margin=margin)).pixels
    assert clear.shape[2] == 4 and not clear[0].any()
    opaque = compose(
        rgb, matte, CutoutOptions(crop=True, crop_margin=margin, background=(1, 2, 3, 255))
    )
    assert opaque.pixels.shape[2] == 3 and (opaque.pixels[0] == (1, 2, 3)).all()
    options = CutoutOptions(crop=True, crop_margin=margin, background=(200, 100, 50, 128))
    translucent = compose(rgb, matte, options).pixels
    assert (translucent[0] == (200, 100, 50, 128)).all()


# -- the foreground's box -------------------------------------------------------------------
def _square() -> tuple[torch.Tensor, torch.Tensor]:
    rgb, _ = scene(11, 60, 80)
    matte = torch.zeros((60, 80), dtype=torch.uint8)
    matte[20:40, 30:50] = 255
    matte[19, 30:50] = 40  # a soft top edge
    return rgb, matte


def test_the_foreground_of_a_plain_cutout_is_the_subject() -> None:
    rgb, matte = _square()
    out = compose(rgb, matte, CutoutOptions())
    assert out.subject == out.foreground == (30, 19, 50, 40)
    assert alpha_box(out.pixels[..., 3]) == out.foreground


def test_a_cropped_foreground_is_in_the_crops_coordinates() -> None:
    rgb, matte = _square()
    out = compose(rgb, matte, CutoutOptions(crop=True))
    assert out.foreground == (0, 0, 20, 21)
    out = compose(rgb, matte, CutoutOptions(crop=True, crop_margin=parse_margin("5px 10px")))
    assert out.pixels.shape == (31, 40, 4)
    assert out.foreground == (10, 5, 30, 26) == alpha_box(out.pixels[..., 3])


def test_a_margin_past_the_frames_edge_moves_the_foreground_by_the_whole_margin() -> None:
    rgb, matte = scene(13, 50, 70, "top left")
    subject = subject_box(matte)
    assert subject is not None and subject[:2] == (0, 0)
    out = compose(rgb, matte, CutoutOptions(crop=True, crop_margin=parse_margin("25px")))
    right, bottom = subject[2:]
    assert out.foreground == (25, 25, right + 25, bottom + 25)
    assert out.foreground == alpha_box(out.pixels[..., 3])
    on_white = CutoutOptions(crop=True, crop_margin=parse_margin("25px"), background=WHITE)
    assert compose(rgb, matte, on_white).foreground == out.foreground  # no alpha: the matte's


def test_a_scaled_foreground_is_what_the_scaled_image_shows() -> None:
    """Scaling is antialiased: an edge spreads over a pixel more than its scaled position, and
    a faint one may round away, so the box is read from the scaled matte."""
    rgb, matte = _square()
    for max_pixels, crop in product([1200, 700, 97], [False, True]):
        out = compose(rgb, matte, CutoutOptions(crop=crop, max_pixels=max_pixels))
        height, width = out.pixels.shape[:2]
        assert height * width <= max_pixels
        assert out.foreground == alpha_box(out.pixels[..., 3])
        region = (30, 19, 50, 40) if crop else (0, 0, 80, 60)
        scale_x = width / (region[2] - region[0])
        scale_y = height / (region[3] - region[1])
        left, top = math.floor((30 - region[0]) * scale_x), math.floor((19 - region[1]) * scale_y)
        right = min(width, math.ceil((50 - region[0]) * scale_x))
        bottom = min(height, math.ceil((40 - region[1]) * scale_y))
        assert out.foreground is not None
        found = np.array(out.foreground)
        assert np.abs(found - (left, top, right, bottom)).max() <= 1


def test_an_empty_matte_has_no_foreground() -> None:
    rgb, _ = _square()
    empty = torch.zeros((60, 80), dtype=torch.uint8)
    for options in (CutoutOptions(), CutoutOptions(crop=True), CutoutOptions(max_pixels=100)):
        out = compose(rgb, empty, options)
        assert out.subject is None and out.foreground is None


def _numpy_box(matte: np.ndarray) -> Box | None:
    rows, cols = np.nonzero(matte)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def test_the_subject_box_is_the_non_zero_pixels_bounds_at_every_edge() -> None:
    generator = np.random.default_rng(5)
    mattes = [np.zeros((7, 9), np.uint8), np.full((7, 9), 3, np.uint8)]
    for row, col in [(0, 0), (6, 8), (0, 8), (6, 0), (3, 4)]:
        single = np.zeros((7, 9), np.uint8)
        single[row, col] = 1
        mattes.append(single)
    for density in (0.001, 0.02, 0.3):
        mattes += [
            np.where(generator.random((40, 57)) < density, generator.integers(1, 256), 0).astype(
                np.uint8
            )
            for _ in range(20)
        ]
    for matte in mattes:
        assert subject_box(torch.from_numpy(matte)) == _numpy_box(matte)


def test_a_whole_frame_output_leaves_its_box_to_cross_with_the_pixels() -> None:
    """No crop, no scaling: the box is not needed to compose, so it is not waited for on the
    device; it comes back with the pixels, as the same subject and foreground."""
    rgb, matte = _square()
    for options in (CutoutOptions(), CutoutOptions(output="mask"), CutoutOptions(refine=True)):
        item = compose_on_device(rgb, matte, options)
        assert item.box is not None and len(item.tensors()) == 2
        out = item.on_host(*(tensor.numpy() for tensor in item.tensors()))
        assert out.subject == out.foreground == (30, 19, 50, 40)
        with pytest.raises(ValueError, match="box"):
            item.on_host(item.pixels.numpy())
    for options in (CutoutOptions(crop=True), CutoutOptions(max_pixels=700)):
        assert compose_on_device(rgb, matte, options).box is None
    empty = compose_on_device(rgb, torch.zeros_like(matte), CutoutOptions())
    assert empty.on_host(*(t.numpy() for t in empty.tensors())).subject is None


def test_a_region_past_the_frames_edge_without_its_fill_colour_is_refused() -> None:
    """A crop's margin past the edge is filled on the host with the colour read while
    composing; an output made without it says so instead of filling with a guess."""
    rgb, matte = _square()
    item = compose_on_device(rgb, matte, CutoutOptions(crop=True, crop_margin=parse_margin("40px")))
    assert item.region != item.inside and item.fill is not None
    unfilled = dataclasses.replace(item, fill=None)
    with pytest.raises(ValueError, match="colour to fill it with"):
        unfilled.on_host(item.pixels.numpy())
