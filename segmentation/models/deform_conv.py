"""Modulated deformable convolution (DCNv2) in plain PyTorch ops, safe under CUDA graphs.

RMBG-2.0's decoder (BiRefNet's ``ASPPDeformable``) calls ``torchvision.ops.deform_conv2d``.
Torchvision's CUDA kernel for it (``deformable_im2col_kernel``, torchvision 0.26) is launched
without a stream, on the legacy default stream, whatever stream PyTorch has made current:

- run on any other stream, it races the work queued there (an eager forward on a side stream
  gave NaN for two thirds of the logits on an H100);
- under CUDA-graph capture it is not recorded at all, so every replay reuses the columns the
  kernel wrote during capture: the deformable layers of a replayed graph see the capture's
  input, not the frame's (replay differed from eager by up to 0.027 in the logits with random
  weights, 176 of 1,007 module outputs, starting at the first ``DeformableConv2d``).

This version samples with ``F.grid_sample`` (bilinear, zero outside the image: torchvision's
sampling rule) and multiplies by the weights with one batched matmul per chunk, every op on
the current stream. It also bounds its own memory: torchvision builds the columns of up to 32
frames at once (``C * kh * kw * H * W`` values each, 6.6 GB in FP16 for 16 frames at the
decoder's 256x256 level); here a chunk of frames, or of one frame's kernel taps, is sized to
``chunk_bytes``, and the taps of a chunk are summed into the output in the output's dtype. Sampling
coordinates are computed in FP32 whatever the input dtype (torchvision computes them in the
input's dtype: an eighth of a pixel at 256 in FP16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Largest FP32 sampling buffer one chunk of frames may use.
CHUNK_BYTES = 256 << 20


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` for one weight group and one offset group.

    ``x`` is ``[B, C, H, W]``, ``weight`` ``[O, C, kh, kw]``, ``offset``
    ``[B, 2*kh*kw, Ho, Wo]`` (channel ``2k`` the row shift of kernel tap ``k = i*kw + j``,
    ``2k+1`` its column shift) and ``mask`` ``[B, kh*kw, Ho, Wo]``.
    """
    batch, channels, height, width = x.shape
    out_channels, weight_channels, kh, kw = weight.shape
    taps = kh * kw
    if weight_channels != channels or offset.shape[1] != 2 * taps:
        raise ValueError(
            "only one weight group and one offset group are supported: "
            f"input {tuple(x.shape)}, weight {tuple(weight.shape)}, offset {tuple(offset.shape)}"
        )
    if mask is not None and mask.shape[1] != taps:
        raise ValueError(f"mask has {mask.shape[1]} channels, expected {taps}")
    out_h, out_w = offset.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    device = x.device
    # Where each tap of each output position reads, in input pixels (FP32): [taps, Ho, Wo].
    rows = torch.arange(out_h, device=device, dtype=torch.float32) * sh - ph
    cols = torch.arange(out_w, device=device, dtype=torch.float32) * sw - pw
    tap_rows = torch.arange(kh, device=device, dtype=torch.float32).repeat_interleave(kw) * dh
    tap_cols = torch.arange(kw, device=device, dtype=torch.float32).repeat(kh) * dw
    base_y = (tap_rows.view(taps, 1, 1) + rows.view(1, out_h, 1)).expand(taps, out_h, out_w)
    base_x = (tap_cols.view(taps, 1, 1) + cols.view(1, 1, out_w)).expand(taps, out_h, out_w)
    taps_weight = weight.reshape(out_channels, channels, taps)
    # A chunk is `frames` frames by `group` taps, its FP32 samples within `chunk_bytes`.
    per_tap = channels * out_h * out_w * 4
    frames = max(1, min(batch, chunk_bytes // max(per_tap * taps, 1)))
    group = taps if frames > 1 else max(1, min(taps, chunk_bytes // max(per_tap, 1)))
    out = x.new_empty((batch, out_channels, out_h * out_w))
    for start in range(0, batch, frames):
        stop = min(batch, start + frames)
        n = stop - start
        source = x[start:stop].float()
        shift = offset[start:stop].float().view(n, taps, 2, out_h, out_w)
        target = out[start:stop]
        for first in range(0, taps, group):
            last = min(taps, first + group)
            # grid_sample's unnormalisation with align_corners=False: p = ((g + 1) * size - 1) / 2.
            gy = (base_y[first:last] + shift[:, first:last, 0]).mul_(2.0 / height)
            gx = (base_x[first:last] + shift[:, first:last, 1]).mul_(2.0 / width)
            grid = torch.stack(
                (gx.add_(1.0 / width - 1.0), gy.add_(1.0 / height - 1.0)), dim=-1
            ).view(n, (last - first) * out_h, out_w, 2)
            sampled = F.grid_sample(
                source, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            ).view(n, channels, last - first, out_h * out_w)  # the columns, tap-major per channel
            if mask is not None:
                modulation = mask[start:stop, first:last].float()
                sampled.mul_(modulation.reshape(n, 1, last - first, out_h * out_w))
            columns = sampled.to(x.dtype).view(n, channels * (last - first), -1)
            part = taps_weight[:, :, first:last].reshape(out_channels, -1)
            if first == 0:
                torch.matmul(part, columns, out=target)
            else:
                target.baddbmm_(part.expand(n, -1, -1), columns)
    result = out.view(batch, out_channels, out_h, out_w)
    if bias is not None:
        result = result + bias.view(1, -1, 1, 1)
    return result
