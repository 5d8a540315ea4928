"""Per-call options of the models that the service layer passes through (no torch here:
the router imports them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from segmentation.errors import InvalidRequestError

ModelKind = Literal["rmbg", "yolo"]
MODEL_KINDS: tuple[ModelKind, ...] = ("rmbg", "yolo")

#: What background removal answers per frame: an RGBA cutout PNG, a grayscale matte PNG, or
#: the matte's raw bytes (``HxW`` uint8, row-major: gRPC's ``RAW_ALPHA``).
Output = Literal["rgba", "mask", "raw"]
OUTPUTS: tuple[Output, ...] = ("rgba", "mask", "raw")


@dataclass(frozen=True)
class DetectOptions:
    """Per-call thresholds, validated."""

    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[int, ...] | None = None
    max_det: int = 300

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be between 0 and 1, got {self.conf}")
        if not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"iou must be between 0 and 1, got {self.iou}")
        if not 1 <= self.max_det <= 1000:
            raise ValueError(f"max_det must be between 1 and 1000, got {self.max_det}")
        if self.classes is not None:
            # A tuple, so options stay hashable (a batch groups its frames by them) whatever
            # sequence a caller or a config gave; repeated ids count once.
            object.__setattr__(self, "classes", tuple(dict.fromkeys(int(c) for c in self.classes)))


# -- cutouts ------------------------------------------------------------------------------
#: Image formats a cutout or matte is encoded in.
ImageFormat = Literal["png", "webp", "jpeg"]
IMAGE_FORMATS: tuple[ImageFormat, ...] = ("png", "webp", "jpeg")
MEDIA_TYPES: dict[ImageFormat, str] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}
#: An RGBA colour, each channel 0-255.
Color = tuple[int, int, int, int]
#: One side of a crop margin: ``(value, relative)``; relative values are a share of the
#: subject's size along that side (0.1: 10%), absolute ones are pixels.
MarginSide = tuple[float, bool]
#: Margins ``(top, right, bottom, left)``.
Margin = tuple[MarginSide, MarginSide, MarginSide, MarginSide]
NO_MARGIN: Margin = ((0.0, False),) * 4
#: A margin side is capped at the larger of these: half the subject's size along it, or
#: 500 pixels (the cap remove.bg documents), so a margin cannot make an output unbounded.
MAX_MARGIN_SHARE = 0.5
MAX_MARGIN_PX = 500


@dataclass(frozen=True)
class CutoutOptions:
    """What one background-removal answer is: which output, how it is composed, how encoded.

    The defaults are the plain cutout (the frame's pixels with the matte as alpha, PNG).
    Everything here is applied on the model's device where the frame and matte are
    (``segmentation.compose``), then encoded on the replica's codec threads. Invalid
    combinations raise :class:`InvalidRequestError` naming every problem at once.
    """

    #: ``rgba`` cutout, ``mask`` (grayscale matte) or ``raw`` matte bytes (gRPC).
    output: Output = "rgba"
    #: Estimate the foreground's own colour at soft edges (``segmentation.refine``) instead
    #: of keeping the original pixels, which carry the old background's colour.
    refine: bool = False
    #: Compose onto this RGBA colour; None keeps the alpha channel. An opaque colour gives
    #: an RGB image (no alpha channel).
    background: Color | None = None
    #: Cut the output to the subject's bounding box (pixels whose alpha is not 0) plus
    #: ``crop_margin``; a margin past the frame's edge is transparent (or the background).
    crop: bool = False
    crop_margin: Margin = NO_MARGIN
    #: Scale the output down (aspect kept) to at most this many pixels; None: full size.
    max_pixels: int | None = None
    #: Clean the matte to a hard mask first (morphological opening, Gaussian blur,
    #: threshold at half), as rembg's ``post_process_mask`` does.
    clean_matte: bool = False
    format: ImageFormat = "png"
    #: Lossy quality of ``jpeg`` and of ``webp`` unless ``lossless`` (1-100).
    quality: int = 90
    #: ``webp`` only: lossless WebP.
    lossless: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InvalidRequestError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these options, in words that name the parameter."""
        problems: list[str] = []
        if self.output not in OUTPUTS:
            problems.append(f"output={self.output!r}: expected one of {', '.join(OUTPUTS)}")
        if self.format not in IMAGE_FORMATS:
            problems.append(f"format={self.format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.quality <= 100:
            problems.append(f"quality={self.quality}: must be between 1 and 100")
        if self.lossless and self.format != "webp":
            problems.append(f"lossless applies to format=webp only (format={self.format})")
        if self.max_pixels is not None and self.max_pixels < 1:
            problems.append(f"max_pixels={self.max_pixels}: must be at least 1")
        if self.output != "rgba" and (self.refine or self.background is not None):
            problems.append(f"refine and background apply to output=rgba (output={self.output})")
        if self.output == "raw" and not self.plain:
            problems.append("output=raw is the matte's bytes: it takes no crop, size or format")
        if (
            self.format == "jpeg"
            and self.output == "rgba"
            and (self.background is None or self.background[3] != 255)
        ):
            problems.append(
                "format=jpeg has no alpha channel: give an opaque background colour "
                "(e.g. background=ffffff) or use format=png or webp"
            )
        if self.background is not None and (
            len(self.background) != 4 or any(not 0 <= c <= 255 for c in self.background)
        ):
            problems.append(f"background={self.background}: expected 4 channels of 0-255")
        for value, _relative in self.crop_margin:
            if not value >= 0 or value == float("inf"):
                problems.append(f"crop_margin: {value} is not a margin (0 or more)")
                break
        return problems

    @property
    def plain(self) -> bool:
        """Only the output is chosen: the cutout or matte as it always was, in PNG."""
        return all(getattr(self, f.name) == f.default for f in fields(self) if f.name != "output")

    @property
    def channels(self) -> int:
        """Channels of the output image: 1 (matte), 3 (on an opaque colour) or 4 (RGBA)."""
        if self.output != "rgba":
            return 1
        return 3 if self.background is not None and self.background[3] == 255 else 4

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format] if self.output != "raw" else "application/octet-stream"


def parse_color(text: str) -> Color:
    """An RGBA colour from what people write: hex ``81d4fa``, ``#fff``, ``81d4fa77`` (with
    alpha), a CSS colour name (``green``), or decimal ``r,g,b`` / ``r,g,b,a``: the client's
    parser (``segmentation_client.wire.parse_color``), so both read a colour alike; 422
    naming what is accepted."""
    from segmentation_client import wire

    try:
        return wire.parse_color(text)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def parse_margin(text: str) -> Margin:
    """A crop margin as remove.bg writes it: one value (every side), two (top and bottom,
    left and right) or four (top, right, bottom, left); each in pixels (``30``, ``30px``) or
    relative to the subject's size (``10%``)."""
    tokens = text.replace(",", " ").split()
    sides: list[MarginSide] = []
    for token in tokens:
        relative = token.endswith("%")
        number = token.removesuffix("%").removesuffix("px")
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf") or (relative and value > 1000):
            raise InvalidRequestError(
                f"crop_margin {text!r}: each value is pixels (30, 30px) or a share of the "
                "subject (10%), 0 or more"
            )
        sides.append((value / 100 if relative else value, relative))
    if len(sides) == 1:
        sides *= 4
    elif len(sides) == 2:
        sides = [sides[0], sides[1], sides[0], sides[1]]
    if len(sides) != 4:
        raise InvalidRequestError(
            f"crop_margin {text!r}: give 1, 2 or 4 values (top, right, bottom, left)"
        )
    return (sides[0], sides[1], sides[2], sides[3])


def parse_bool(name: str, value: object) -> bool:
    """A boolean form or JSON field: true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise InvalidRequestError(f"{name}={value!r}: expected true or false")


def margin_region(box: tuple[int, int, int, int], margin: Margin) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` (top, right, bottom, left), each side capped at the
    larger of half the subject's size along it and 500 pixels; may reach past the frame."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top

    def side(index: int, extent: int) -> int:
        value, relative = margin[index]
        pixels = value * extent if relative else value
        cap = max(MAX_MARGIN_SHARE * extent, MAX_MARGIN_PX)
        return round(min(pixels, cap))

    return (
        left - side(3, width),
        top - side(0, height),
        right + side(1, width),
        bottom + side(2, height),
    )


def output_pixels_bound(width: int, height: int, options: CutoutOptions) -> int:
    """The most pixels the output of a ``width`` x ``height`` frame can have under
    ``options``, whatever its matte: what admission can hold for it before the model runs.

    A crop is largest for a subject that fills the frame (each side's margin grows with the
    subject's size), then ``max_pixels`` caps it. A scaled size is floored to at most
    ``max_pixels`` except for a region thinner than the scale, which keeps one pixel across
    and then up to ``sqrt(max_pixels x its length)`` along (``compose.fit_size``)."""
    region_width, region_height = width, height
    if options.crop:
        left, top, right, bottom = margin_region((0, 0, width, height), options.crop_margin)
        region_width, region_height = right - left, bottom - top
    pixels = region_width * region_height
    if options.max_pixels is None or pixels <= options.max_pixels:
        return pixels
    return max(
        options.max_pixels, math.isqrt(options.max_pixels * max(region_width, region_height))
    )
