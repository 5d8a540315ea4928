"""Cutouts composed on the model's device, where the frame and its matte already are.

From a frame (``3xHxW`` uint8) and its matte (``HxW`` uint8) to the pixels a client asked
for (:class:`CutoutOptions`): optionally the matte cleaned to a hard mask, the subject's box
found, the output cropped to it (plus a margin, transparent past the frame's edge), scaled
down to a pixel budget, the foreground's own colour estimated at soft edges
(:mod:`segmentation.refine`), and composed onto a background colour. Only the result goes to
the host, so a crop or a smaller size also means fewer bytes copied and encoded.

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
from segmentation.refine import estimate_foreground

#: ``(left, top, right, bottom)`` in pixels, right and bottom exclusive.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Composed:
    """What :func:`compose` made: ``pixels`` (``HxWxC`` uint8: C 1, 3 or 4, RGB order) and
    ``subject``, the box of the matte's non-zero pixels in the frame (None: the matte is 0
    everywhere, nothing was found)."""

    pixels: np.ndarray
    subject: Box | None


def subject_box(matte: torch.Tensor) -> Box | None:
    """Box of the pixels of ``matte`` (``HxW``) that are not 0; None when there are none."""
    rows = matte.amax(dim=1) > 0
    cols = matte.amax(dim=0) > 0
    if not bool(rows.any()):
        return None
    row_index = torch.nonzero(rows).flatten()
    col_index = torch.nonzero(cols).flatten()
    top, bottom = int(row_index[0]), int(row_index[-1]) + 1
    left, right = int(col_index[0]), int(col_index[-1]) + 1
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
    if options.output == "raw":
        raise ValueError("output=raw is the matte's bytes: nothing to compose")
    if options.clean_matte:
        matte = clean_matte(matte)
    subject = subject_box(matte)
    if options.crop and subject is not None:
        region = margin_region(subject, options.crop_margin)
        rgb, matte = _cut(rgb, region), _cut(matte[None], region)[0]
    size = fit_size(int(matte.shape[0]), int(matte.shape[1]), options.max_pixels)
    if size != tuple(matte.shape):
        rgb, matte = _scaled(rgb, size), _scaled(matte[None], size)[0]
    if options.output == "mask":
        pixels = matte[..., None]
    elif not options.refine and options.background is None:
        pixels = plain_cutout(rgb, matte)
    else:
        pixels = _composed(rgb, matte, options)
    return Composed(pixels.cpu().numpy(), subject)


def _composed(rgb: torch.Tensor, matte: torch.Tensor, options: CutoutOptions) -> torch.Tensor:
    """Edge colours refined and/or the cutout laid over a background colour ("over"
    compositing), in float; ``HxWxC`` uint8."""
    alpha = matte.float()[None] / 255  # [1, H, W]
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
        stacked[3] = matte  # the matte exactly, not a float round trip
    return stacked.permute(1, 2, 0)
