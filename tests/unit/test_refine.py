"""Edge colours: the blur-fusion foreground estimate against composites of known truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.compose import compose
from segmentation.options import CutoutOptions
from segmentation.refine import box_mean, edge_colour_error, estimate_foreground, wide_window
from segmentation_standins.composites import soft_composite


def _tensors(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    composite = soft_composite(seed, size, size)
    image = torch.from_numpy(composite.image).permute(2, 0, 1).float() / 255
    alpha = torch.from_numpy(composite.alpha)[None].float() / 255
    truth = torch.from_numpy(composite.foreground).permute(2, 0, 1)
    return image, alpha, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refined_edges_have_at_most_half_the_colour_error_of_the_plain_cutout(seed: int) -> None:
    image, alpha, truth = _tensors(seed, 160)
    band = (alpha > 0) & (alpha < 1)
    assert float(band.float().mean()) > 0.1, "the composite must be mostly soft at its edges"
    plain = edge_colour_error(image, truth, alpha)
    refined = edge_colour_error(estimate_foreground(image, alpha), truth, alpha)
    assert refined <= 0.5 * plain, (plain, refined)


def test_opaque_pixels_keep_their_colour() -> None:
    image, alpha, _ = _tensors(3, 96)
    refined = estimate_foreground(image, alpha)
    opaque = (alpha == 1).expand_as(image)
    assert opaque.any()
    assert torch.allclose(refined[opaque], image[opaque], atol=1e-4)


def test_a_batch_is_refined_as_its_frames_one_by_one() -> None:
    first, alpha_a, _ = _tensors(4, 64)
    second, alpha_b, _ = _tensors(5, 64)
    batched = estimate_foreground(torch.stack([first, second]), torch.stack([alpha_a, alpha_b]))
    assert torch.allclose(batched[0], estimate_foreground(first, alpha_a), atol=1e-5)
    assert torch.allclose(batched[1], estimate_foreground(second, alpha_b), atol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 6, 90])
def test_box_mean_is_the_mean_over_the_window_clipped_to_the_frame(size: int) -> None:
    x = torch.rand(2, 13, 17, generator=torch.Generator().manual_seed(size))
    got = box_mean(x, size)
    before, after = size // 2, size - 1 - size // 2
    for row in range(13):
        for col in range(17):
            window = x[
                :, max(0, row - before) : row + after + 1, max(0, col - before) : col + after + 1
            ]
            assert torch.allclose(got[:, row, col], window.mean(dim=(-1, -2)), atol=1e-5)


def test_a_refined_cutout_keeps_the_matte_and_zeroes_what_it_hides() -> None:
    composite = soft_composite(6, 120, 100)
    rgb = torch.from_numpy(composite.image).permute(2, 0, 1)
    matte = torch.from_numpy(composite.alpha)
    out = compose(rgb, matte, CutoutOptions(refine=True)).pixels
    assert out.shape == (100, 120, 4)
    assert np.array_equal(out[..., 3], composite.alpha)
    assert not out[..., :3][composite.alpha == 0].any()
    opaque = composite.alpha == 255
    assert np.abs(out[..., :3][opaque].astype(int) - composite.image[opaque].astype(int)).max() <= 1


def test_the_wide_window_grows_with_frames_larger_than_the_model_input() -> None:
    assert wide_window(270, 480) == 90  # BiRefNet's window up to 720-pixel frames
    assert wide_window(1080, 1920) == 240
    assert wide_window(2160, 3840) == 480
