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

On a CUDA tensor of FP16 or BF16 (with Triton) the columns are made by one Triton kernel,
:func:`deform_columns`: each sampling position computed in FP32 from the offsets as they
come out of their convolution, the four neighbours read from the input where it lies (any
layout), weighted, multiplied by the modulation and written once in the input's dtype. In
PyTorch that is a cast of the input and of the offsets to FP32, the grid built in four
elementwise passes, ``grid_sample`` in FP32, the modulation's pass over the FP32 samples and
their cast back: on an H200 at batch 16 these were 2.7 of the decoder's 7.1 ms a frame
(``benchmarks.rmbg_profile``, docs/benchmarks.md). :func:`deform_columns_reference` is the
same arithmetic in PyTorch (the tests compare the two, the kernel also under Triton's
interpreter on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segmentation.models.rmbg20_kernels import launch_on, triton, use_kernel

if triton is not None:
    import triton.language as tl

#: Largest sampling buffer (FP32 samples, or the kernel's columns) one chunk may use.
CHUNK_BYTES = 256 << 20


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def deform_columns_reference(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    taps: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The sampled columns of taps ``taps[0]`` to ``taps[1]`` (exclusive) for every frame of
    ``x`` (``[n, C, H, W]``; ``offset`` ``[n, 2*kh*kw, Ho, Wo]``, ``mask`` ``[n, kh*kw, Ho,
    Wo]``): ``[n, C, taps, Ho*Wo]`` in ``x``'s dtype, bilinear, zero outside the image,
    times the modulation."""
    n, channels, height, width = x.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    first, last = taps
    count = kh * kw
    out_h, out_w = offset.shape[-2:]
    device = x.device
    rows = torch.arange(out_h, device=device, dtype=torch.float32) * sh - ph
    cols = torch.arange(out_w, device=device, dtype=torch.float32) * sw - pw
    tap_rows = torch.arange(kh, device=device, dtype=torch.float32).repeat_interleave(kw) * dh
    tap_cols = torch.arange(kw, device=device, dtype=torch.float32).repeat(kh) * dw
    base_y = (tap_rows.view(count, 1, 1) + rows.view(1, out_h, 1))[first:last]
    base_x = (tap_cols.view(count, 1, 1) + cols.view(1, 1, out_w))[first:last]
    shift = offset.float().view(n, count, 2, out_h, out_w)[:, first:last]
    # grid_sample's unnormalisation with align_corners=False: p = ((g + 1) * size - 1) / 2.
    gy = (base_y + shift[:, :, 0]).mul_(2.0 / height)
    gx = (base_x + shift[:, :, 1]).mul_(2.0 / width)
    grid = torch.stack((gx.add_(1.0 / width - 1.0), gy.add_(1.0 / height - 1.0)), dim=-1).view(
        n, (last - first) * out_h, out_w, 2
    )
    sampled = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    ).view(n, channels, last - first, out_h * out_w)  # the columns, tap-major per channel
    if mask is not None:
        modulation = mask[:, first:last].float()
        sampled.mul_(modulation.reshape(n, 1, last - first, out_h * out_w))
    return sampled.to(x.dtype)


def deform_columns(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    taps: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    kernel: bool | None = None,
) -> torch.Tensor:
    """See :func:`deform_columns_reference`; the Triton kernel on a CUDA FP16/BF16 tensor
    (``kernel``: True runs it anywhere, the interpreter on the CPU; False never)."""
    if not use_kernel(x, kernel):
        return deform_columns_reference(
            x, offset, mask, taps, kernel_size, stride, padding, dilation
        )
    n, channels, height, width = x.shape
    first, last = taps
    out_h, out_w = offset.shape[-2:]
    positions = out_h * out_w
    out = x.new_empty((n, channels, last - first, positions))
    modulation = mask if mask is not None else offset  # read only when there is a mask
    block_c = min(32, triton.next_power_of_2(channels))
    grid = (
        n * (last - first),
        triton.cdiv(positions, _DEFORM_BLOCK_P),
        triton.cdiv(channels, block_c),
    )
    with launch_on(x):
        _deform_columns_kernel[grid](
            x, offset, modulation, out,
            channels, height, width, out_w, positions, first, last - first,
            *x.stride(), *offset.stride(), *modulation.stride(),
            kernel_size[1], *stride, *padding, *dilation,
            HAS_MASK=mask is not None, BLOCK_C=block_c, BLOCK_P=_DEFORM_BLOCK_P, num_warps=4,
        )  # fmt: skip
    return out


#: Output positions a program of the sampling kernel takes.
_DEFORM_BLOCK_P = 128

if triton is not None:

    @triton.jit
    def _corner(planes, yy, xx, ok, weight, in_c, sxh, sxw):
        """One neighbour's values (``[BLOCK_C, BLOCK_P]``, FP32; zero where not ``ok``)
        times its bilinear weight."""
        value = tl.load(
            planes + (yy * sxh + xx * sxw)[None, :], mask=in_c[:, None] & ok[None, :], other=0.0
        )
        return value.to(tl.float32) * weight[None, :]

    @triton.jit
    def _deform_columns_kernel(
        x_ptr, offset_ptr, mask_ptr, out_ptr,
        channels, height, width, out_w, positions, first, group,
        sxb, sxc, sxh, sxw, sob, soc, soh, sow, smb, smc, smh, smw,
        kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        """One frame and tap, ``BLOCK_P`` output positions, ``BLOCK_C`` channels: each
        position's sampling point from its offsets (FP32), its four neighbours' weights
        (zero for a neighbour outside the image), the channels' values mixed and modulated,
        written once in the output's dtype."""
        frame = tl.program_id(0) // group
        slot = tl.program_id(0) % group
        tap = first + slot
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_p, in_c = p < positions, c < channels
        oy, ox = p // out_w, p % out_w
        shifts = offset_ptr + frame * sob + oy * soh + ox * sow
        dy = tl.load(shifts + (2 * tap) * soc, mask=in_p, other=0.0).to(tl.float32)
        dx = tl.load(shifts + (2 * tap + 1) * soc, mask=in_p, other=0.0).to(tl.float32)
        y = (oy * stride_h - pad_h + (tap // kw) * dil_h).to(tl.float32) + dy
        x = (ox * stride_w - pad_w + (tap % kw) * dil_w).to(tl.float32) + dx
        y0f, x0f = tl.floor(y), tl.floor(x)
        ly, lx = y - y0f, x - x0f
        y0, x0 = y0f.to(tl.int32), x0f.to(tl.int32)
        y1, x1 = y0 + 1, x0 + 1
        scale = tl.full((BLOCK_P,), 1.0, tl.float32)
        if HAS_MASK:
            modulation = mask_ptr + frame * smb + tap * smc + oy * smh + ox * smw
            scale = tl.load(modulation, mask=in_p, other=0.0).to(tl.float32)
        ok_y0 = (y0 >= 0) & (y0 < height)
        ok_y1 = (y1 >= 0) & (y1 < height)
        ok_x0 = (x0 >= 0) & (x0 < width)
        ok_x1 = (x1 >= 0) & (x1 < width)
        planes = x_ptr + frame * sxb + c[:, None] * sxc
        weight = (1.0 - ly) * (1.0 - lx) * scale
        acc = _corner(planes, y0, x0, ok_y0 & ok_x0 & in_p, weight, in_c, sxh, sxw)
        weight = (1.0 - ly) * lx * scale
        acc += _corner(planes, y0, x1, ok_y0 & ok_x1 & in_p, weight, in_c, sxh, sxw)
        weight = ly * (1.0 - lx) * scale
        acc += _corner(planes, y1, x0, ok_y1 & ok_x0 & in_p, weight, in_c, sxh, sxw)
        weight = ly * lx * scale
        acc += _corner(planes, y1, x1, ok_y1 & ok_x1 & in_p, weight, in_c, sxh, sxw)
        rows = (frame * channels + c) * group + slot
        tl.store(
            out_ptr + rows[:, None] * positions + p[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=in_c[:, None] & in_p[None, :],
        )


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
    kernel: bool | None = None,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` for one weight group and one offset group
    (``kernel``: as :func:`deform_columns`).

    ``x`` is ``[B, C, H, W]``, ``weight`` ``[O, C, kh, kw]``, ``offset``
    ``[B, 2*kh*kw, Ho, Wo]`` (channel ``2k`` the row shift of kernel tap ``k = i*kw + j``,
    ``2k+1`` its column shift) and ``mask`` ``[B, kh*kw, Ho, Wo]``.
    """
    batch, channels = x.shape[:2]
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
    kernel_size = (kh, kw)
    taps_weight = weight.reshape(out_channels, channels, taps)
    # A chunk is `frames` frames by `group` taps, its samples within `chunk_bytes` (FP32 in
    # PyTorch, the input's dtype from the kernel).
    sample_bytes = x.element_size() if use_kernel(x, kernel) else 4
    per_tap = channels * out_h * out_w * sample_bytes
    frames = max(1, min(batch, chunk_bytes // max(per_tap * taps, 1)))
    group = taps if frames > 1 else max(1, min(taps, chunk_bytes // max(per_tap, 1)))
    out = x.new_empty((batch, out_channels, out_h * out_w))
    for start in range(0, batch, frames):
        stop = min(batch, start + frames)
        n = stop - start
        target = out[start:stop]
        for first in range(0, taps, group):
            last = min(taps, first + group)
            columns = deform_columns(
                x[start:stop],
                offset[start:stop],
                mask[start:stop] if mask is not None else None,
                (first, last),
                kernel_size,
                (sh, sw),
                (ph, pw),
                (dh, dw),
                kernel,
            ).view(n, channels * (last - first), -1)
            part = taps_weight[:, :, first:last].reshape(out_channels, -1)
            if first == 0:
                torch.matmul(part, columns, out=target)
            else:
                target.baddbmm_(part.expand(n, -1, -1), columns)
    result = out.view(batch, out_channels, out_h, out_w)
    if bias is not None:
        result = result + bias.view(1, -1, 1, 1)
    return result
