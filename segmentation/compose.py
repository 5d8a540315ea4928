"""Cutouts composed on the model's device, where the frame and its matte already are.

From a frame (``3xHxW`` uint8) and its matte (``HxW`` uint8) to the pixels a client asked
for (:class:`CutoutOptions`): optionally the matte cleaned to a hard mask, the subject's box
found, the output cropped to it (plus a margin, transparent past the frame's edge), scaled
down to a pixel budget, the foreground's own colour estimated at soft edges
(:mod:`segmentation.refine`), and composed onto a background colour. Only the result goes to
the host, so a crop or a smaller size also means fewer bytes copied and encoded.

A crop's margin may reach past the frame's edge, by up to half the subject's size or 500 px a
side (:func:`segmentation.options.margin_region`): a full-frame subject gives up to twice the
frame each way, more on small frames. What lies there is one colour, the one a pixel of matte
0 is given (nothing; on a background, that colour over nothing), so the float steps run on
the part of the region inside the frame and the rest is filled on the host, in uint8, after
the copy: never computed in float, never copied from the device. Refinement looks around each
pixel, so it runs on the frame's part and a band of the zeros past the edge as wide as its
wide window (an eighth of the region's longer side, at least 90 px), all it would have seen
of them. A 1000x800 frame, its subject the whole frame, margins of 100% (a 2000x1800 output),
refined on a translucent colour: refinement runs on 1.95 Mpx instead of 3.6, compositing on
0.8 instead of 3.6, and the device copies 3.2 MB to the host instead of 14.4 (counted from the
sizes, not timed). The pixels are bitwise those of padding the region first
(``tests/unit/test_compose.py`` holds that algorithm and compares every option) on the CPU;
on CUDA, refinement's running sums are added in an order that follows a row's length, so its
colours may differ from the padded region's by float rounding.

A scaled output (``max_pixels``) still has its region padded first: the antialiased filter
mixes what lies past the edge into the pixels inside, so it needs it whole. Only that resize
sees the padded region; refinement and compositing run at the scaled size, within the budget.

The plain cutout (no option set) is the frame's pixels where the matte is not 0 and
``(0, 0, 0, 0)`` where it is, as ``segmentation_client.wire.cutout_rgba`` makes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segmentation.options import CutoutOptions, margin_region
from segmentation.refine import estimate_foreground, wide_window
from segmentation.transfer import host_arrays

#: ``(left, top, right, bottom)`` in pixels, right and bottom exclusive.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Composed:
    """What :func:`compose` made: ``pixels`` (``HxWxC`` uint8: C 1, 3 or 4, RGB order);
    ``subject``, the box of the matte's non-zero pixels in the frame, and ``foreground``, the
    box of the non-zero pixels of the output's matte in ``pixels`` (after the crop and any
    scaling: what the answered image shows). Both None when the matte is 0 everywhere
    (``foreground`` also when scaling leaves none of it)."""

    pixels: np.ndarray
    subject: Box | None
    foreground: Box | None


def subject_box(matte: torch.Tensor) -> Box | None:
    """Box of the pixels of ``matte`` (``HxW``) that are not 0; None when there are none."""
    return box_from(subject_box_tensor(matte).cpu().numpy())


def subject_box_tensor(matte: torch.Tensor) -> torch.Tensor:
    """:func:`subject_box` on the matte's device, without waiting for it: int64 ``[5]``,
    ``left, top, right, bottom`` and 1 where there is a subject (0 and a meaningless box
    where there is none); :func:`box_from` reads it."""
    rows = (matte.amax(dim=1) > 0).to(torch.uint8)
    cols = (matte.amax(dim=0) > 0).to(torch.uint8)
    # argmax gives the first of equal maxima: the first row (column) with a subject pixel
    top, left = rows.argmax(), cols.argmax()
    bottom, right = rows.numel() - rows.flip(0).argmax(), cols.numel() - cols.flip(0).argmax()
    return torch.stack([left, top, right, bottom, rows.amax().long()])


def box_from(values: np.ndarray) -> Box | None:
    """The box :func:`subject_box_tensor` found, from its values on the host."""
    if not values[4]:
        return None
    left, top, right, bottom = (int(v) for v in values[:4])
    return left, top, right, bottom


def _cut(image: torch.Tensor, region: Box) -> torch.Tensor:
    """``image`` (``[C, H, W]``) inside ``region``; zeros where the region is past its edge."""
    left, top, right, bottom = region
    height, width = image.shape[-2:]
    inside = image[:, max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    pads = (max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0))
    return F.pad(inside, pads) if any(pads) else inside


def clean_matte(matte: torch.Tensor) -> torch.Tensor:
    """A hard 0/255 mask from a soft matte, as rembg's ``post_process_mask``: an opening by a
    3x3 cross (removes specks and hairlines), a 5x5 Gaussian blur (sigma 2) to round the
    outline, then a threshold at half."""
    x = matte.float()[None, None]
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool, device=x.device)

    def extreme(image: torch.Tensor, largest: bool) -> torch.Tensor:
        padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
        windows = F.unfold(padded, 3)[:, cross.flatten()]  # [1, 5, H*W]
        out = windows.amax(dim=1) if largest else windows.amin(dim=1)
        return out.view_as(image)

    opened = extreme(extreme(x, largest=False), largest=True)
    taps = torch.arange(5, dtype=torch.float32, device=x.device) - 2
    kernel = torch.exp(-(taps**2) / (2 * 2.0**2))
    kernel = kernel / kernel.sum()
    # Edges replicated, not reflected: a reflection needs more pixels than the pad (1x1 images).
    blurred = F.conv2d(F.pad(opened, (2, 2, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 5))
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"), kernel.view(1, 1, 5, 1))
    return torch.where(blurred[0, 0] < 127, 0, 255).to(torch.uint8)


def _scaled(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, H, W]`` uint8 resized to ``size`` (antialiased), still uint8."""
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def fit_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """``(height, width)`` scaled down, aspect kept, to at most ``max_pixels`` (at least 1x1)."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def plain_cutout(rgb: torch.Tensor, matte: torch.Tensor) -> torch.Tensor:
    """``HxWx4`` uint8: the frame's pixels where the matte is not 0, (0, 0, 0, 0) where it is."""
    height, width = matte.shape
    rgba = torch.empty((height, width, 4), dtype=torch.uint8, device=matte.device)
    torch.mul(rgb.permute(1, 2, 0), (matte > 0).unsqueeze(-1), out=rgba[..., :3])
    rgba[..., 3] = matte
    return rgba


def compose(rgb: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> Composed:
    """The output ``options`` ask for, from a ``3xHxW`` uint8 frame and its ``HxW`` uint8
    matte on the same device; see the module doc for the steps and their order."""
    item = compose_on_device(rgb, matte, options)
    return item.on_host(*host_arrays(item.tensors()))


@dataclass(frozen=True)
class OnDevice:
    """A cutout composed on the device, not yet copied: ``pixels`` (``HxWxC`` uint8) are
    the part ``inside`` of the output's ``region`` that lies in the frame. A batch's are
    copied together (:func:`segmentation.transfer.copy_to_host`), then :meth:`on_host`."""

    pixels: torch.Tensor
    region: Box
    inside: Box
    options: CutoutOptions
    subject: Box | None
    foreground: Box | None
    #: The colour of the region's part past the frame's edge (``C`` uint8), read while
    #: composing (None when the region lies inside the frame): :meth:`on_host` does no
    #: device work, so it can run on any thread while the device computes the next batch.
    fill: np.ndarray | None = None
    #: Where the output is the whole frame, unscaled, its subject's box is not needed to
    #: compose it: it stays on the device (:func:`subject_box_tensor`) and crosses to the host
    #: with the pixels, instead of a wait for the device to read it (``subject`` and
    #: ``foreground`` are then read from it).
    box: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """What crosses to the host: the pixels, then the subject's box if still on the device."""
        return [self.pixels] if self.box is None else [self.pixels, self.box]

    def on_host(self, host: np.ndarray, box: np.ndarray | None = None) -> Composed:
        """The output, from ``host``: :attr:`pixels` copied to the host (and ``box``,
        :attr:`box` copied, when there is one)."""
        pixels = _placed(host, self.region, self.inside, self.fill)
        if self.box is None:
            return Composed(pixels, self.subject, self.foreground)
        if box is None:
            raise ValueError("the subject's box was left on the device: pass its copy")
        subject = box_from(box)
        return Composed(pixels, subject, subject)  # the output is the frame: the same box


def compose_on_device(rgb: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> OnDevice:
    """:func:`compose`'s work on the device, without the copy to the host."""
    if options.output == "raw":
        raise ValueError("output=raw is the matte's bytes: nothing to compose")
    if options.clean_matte:
        matte = clean_matte(matte)
    height, width = int(matte.shape[0]), int(matte.shape[1])
    region: Box = (0, 0, width, height)
    if not options.crop and fit_size(height, width, options.max_pixels) == (height, width):
        pixels = _pixels(rgb, matte, options, region, region)
        return OnDevice(pixels, region, region, options, None, None, box=subject_box_tensor(matte))
    subject = subject_box(matte)
    if options.crop and subject is not None:
        region = margin_region(subject, options.crop_margin)
    left, top, right, bottom = region
    size = fit_size(bottom - top, right - left, options.max_pixels)
    if size != (bottom - top, right - left):
        # The antialiased filter mixes what lies past the edge into the pixels inside it:
        # it needs the region whole (see the module doc).
        rgb, matte = _cut(rgb, region), _cut(matte[None], region)[0]
        rgb, matte = _scaled(rgb, size), _scaled(matte[None], size)[0]
        whole = (0, 0, size[1], size[0])
        pixels = _pixels(rgb, matte, options, whole, whole)
        return OnDevice(pixels, whole, whole, options, subject, subject_box(matte))
    inside = (max(left, 0), max(top, 0), min(right, width), min(bottom, height))
    pixels = _pixels(rgb, matte, options, region, inside)
    foreground = None
    if subject is not None:
        foreground = (subject[0] - left, subject[1] - top, subject[2] - left, subject[3] - top)
    fill = None if inside == region else _fill(options, rgb.device)
    return OnDevice(pixels, region, inside, options, subject, foreground, fill)


def _pixels(
    rgb: torch.Tensor, matte: torch.Tensor, options: CutoutOptions, region: Box, inside: Box
) -> torch.Tensor:
    """``HxWxC`` uint8: what ``options`` ask for of ``inside``, the part of ``region`` that
    lies in the frame (``rgb`` and ``matte``, whole)."""
    left, top, right, bottom = inside
    rgb_inside, matte_inside = rgb[:, top:bottom, left:right], matte[top:bottom, left:right]
    if options.output == "mask":
        return matte_inside[..., None]
    if not options.refine and options.background is None:
        return plain_cutout(rgb_inside, matte_inside)
    refine = options.refine
    colour = _refined(rgb, matte, region, inside) if refine else rgb_inside.float() / 255
    return _composed(colour, matte_inside, options)


def _refined(rgb: torch.Tensor, matte: torch.Tensor, region: Box, inside: Box) -> torch.Tensor:
    """The foreground's colours (``[3, H, W]`` float, 0-1) of ``inside``, as estimated on the
    whole ``region`` with zeros past the frame's edge, from ``inside`` and a band of those
    zeros as wide as the wide window on each side where the region goes on.

    Why a whole window: past the edge the first pass gives values (its estimate of the
    background) as far as its window reaches the frame, half a window, each from a window
    reaching half a window further; past the band both passes see only zeros. Half a window
    would do for the windows, not for the last bit: the box means are differences of running
    sums along each row and column, and a sum that ran over values a shorter band got wrong
    rounds differently."""
    left, top, right, bottom = region
    in_left, in_top, in_right, in_bottom = inside
    wide = wide_window(bottom - top, right - left)
    pads = (
        min(in_left - left, wide),
        min(right - in_right, wide),
        min(in_top - top, wide),
        min(bottom - in_bottom, wide),
    )
    colour = rgb[:, in_top:in_bottom, in_left:in_right].float() / 255
    alpha = matte[in_top:in_bottom, in_left:in_right].float()[None] / 255
    if any(pads):
        colour, alpha = F.pad(colour, pads), F.pad(alpha, pads)
    refined = estimate_foreground(colour, alpha, wide=wide)
    rows = slice(pads[2], pads[2] + in_bottom - in_top)
    return refined[:, rows, pads[0] : pads[0] + in_right - in_left]


def _composed(colour: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> torch.Tensor:
    """The foreground's colours (``[3, H, W]`` float, 0-1) under ``matte``, laid over the
    background colour ("over" compositing) or kept with the matte as alpha; ``HxWxC``
    uint8."""
    alpha = matte.float()[None] / 255  # [1, H, W]
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
        stacked[3] = matte  # the matte exactly, not a float round trip
    return stacked.permute(1, 2, 0)


def _placed(host: np.ndarray, region: Box, inside: Box, fill: np.ndarray | None) -> np.ndarray:
    """``host`` (the pixels of ``inside``) in their place in ``region``: the rest, past the
    frame's edge, is ``fill``, the one colour a pixel of matte 0 is given (:func:`_fill`)."""
    if inside == region:
        return host
    if fill is None:
        raise ValueError("a region past the frame's edge needs the colour to fill it with")
    left, top, right, bottom = region
    in_left, in_top, in_right, in_bottom = inside
    placed = np.empty((bottom - top, right - left, host.shape[2]), np.uint8)
    placed[...] = fill
    placed[in_top - top : in_bottom - top, in_left - left : in_right - left] = host
    return placed


def _fill(options: CutoutOptions, device: torch.device) -> np.ndarray:
    """What the steps make of a pixel whose matte is 0 (``C`` uint8): 0 in a mask or a
    cutout; on a background, that colour composed over nothing, by the same float steps as
    every other pixel (the foreground's colour, refined or not, counts for nothing there)."""
    if options.background is None:
        return np.zeros(options.channels, np.uint8)
    colour = torch.zeros((3, 1, 1), dtype=torch.float32, device=device)
    clear = torch.zeros((1, 1), dtype=torch.uint8, device=device)
    pixel: np.ndarray = _composed(colour, clear, options)[0, 0].cpu().numpy()
    return pixel
