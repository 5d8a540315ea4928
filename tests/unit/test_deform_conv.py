"""The deformable convolution that RMBG-2.0's fast path runs instead of torchvision's kernel
(which runs on the legacy default stream and is not recorded by CUDA-graph capture): the same
function as torchvision's ``deform_conv2d``, and the fast path's step that puts it in place."""

from __future__ import annotations

import pytest
import torch
import torchvision

from segmentation.models import rmbg20_fast
from segmentation.models.deform_conv import deform_conv2d


@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "out", "kernel", "stride", "padding", "dilation"),
    [
        (2, 5, 13, 17, 7, 3, 1, 1, 1),
        (3, 4, 9, 8, 6, 7, 1, 3, 1),  # RMBG-2.0's largest tap count (7x7)
        (2, 3, 10, 11, 4, 1, 1, 0, 1),
        (2, 3, 12, 12, 4, 3, 2, 1, 2),
        (1, 2, 1, 5, 3, 3, 1, 1, 1),  # one row: every vertical tap but one reads the padding
    ],
)
@pytest.mark.parametrize("chunk_bytes", [1, 20_000, 1 << 30])  # a tap, some taps, all
def test_equals_torchvision_deform_conv2d(
    batch: int,
    channels: int,
    height: int,
    width: int,
    out: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    chunk_bytes: int,
) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + kernel)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(out, channels, kernel, kernel, generator=generator)
    bias = torch.randn(out, generator=generator)
    out_h = (height + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    # Shifts of several pixels, so that taps land between pixels and outside the image.
    offset = 3 * torch.randn(batch, 2 * kernel * kernel, out_h, out_w, generator=generator)
    mask = 2 * torch.rand(batch, kernel * kernel, out_h, out_w, generator=generator)
    kwargs = {"stride": stride, "padding": padding, "dilation": dilation}
    expected = torchvision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    got = deform_conv2d(x, offset, weight, bias, mask=mask, chunk_bytes=chunk_bytes, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    unmodulated = torchvision.ops.deform_conv2d(x, offset, weight, None, **kwargs)
    torch.testing.assert_close(
        deform_conv2d(x, offset, weight, **kwargs), unmodulated, atol=1e-4, rtol=1e-4
    )


class DeformableConv2d(torch.nn.Module):
    """The published RMBG-2.0 (BiRefNet) module's attributes and forward, as in its code."""

    def __init__(self, channels: int, out: int, kernel: int) -> None:
        super().__init__()
        self.stride = (1, 1)
        self.padding = kernel // 2
        taps = kernel * kernel
        self.offset_conv = torch.nn.Conv2d(channels, 2 * taps, kernel, padding=self.padding)
        self.modulator_conv = torch.nn.Conv2d(channels, taps, kernel, padding=self.padding)
        self.regular_conv = torch.nn.Conv2d(channels, out, kernel, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return torchvision.ops.deform_conv2d(
            x,
            offset,
            self.regular_conv.weight,
            self.regular_conv.bias,
            padding=self.padding,
            mask=modulator,
            stride=self.stride,
        )


def test_the_deform_step_replaces_the_kernel_and_unblocks_graph_capture() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(DeformableConv2d(4, 6, 3), DeformableConv2d(6, 5, 7))
    x = torch.randn(2, 4, 11, 9)
    with torch.inference_mode():
        published = model(x)
    blocker = rmbg20_fast.graph_blocker(model)
    assert blocker is not None and "0 calls torchvision's deform_conv2d" in blocker
    assert rmbg20_fast.optimize(model, ("deform",)) == ("deform",)
    assert rmbg20_fast.graph_blocker(model) is None
    with torch.inference_mode():
        fast = model(x)
    torch.testing.assert_close(fast, published, atol=1e-4, rtol=1e-4)
    assert rmbg20_fast.optimize(torch.nn.Sequential(DeformableConv2d(4, 6, 3)), ()) == ()
