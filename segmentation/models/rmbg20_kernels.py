"""Triton kernels for the Swin blocks of RMBG-2.0's fast path (``fuse`` and ``attn`` steps).

Each function here has a PyTorch version with the same arithmetic (``*_reference``), which
runs on the CPU, on tensors of a dtype the kernels are not for, and where Triton is absent;
the kernels run on CUDA tensors. The tests compare the two (the kernels on the CPU under
Triton's interpreter, ``TRITON_INTERPRET=1``) and the whole path with the published model.

``ln_windows``
    A block's first layer norm, the padding to whole windows, the cyclic shift and the
    window partition in one pass: each windowed token's row is read from the block's input
    (or is zero, for padding) and normalised as it is written. In PyTorch these are a layer
    norm, a pad copy and a gather, three round trips of the block's tokens through memory.
``unwindow_residual_ln``
    The attention's output put back in token order, added to the block's input, and the
    second layer norm of that sum, in one pass that writes the sum (with the MLP's output
    bias added, so that the MLP's second matrix product can add into it in place) and its
    normalised copy.
``window_attention``
    Attention within each window from the ``qkv`` projection as it comes out of the linear
    layer (``[windows, N, 3, heads, D]``): no copies of q, k and v into heads-first order and
    none of the output back. One program a window, head and block of query rows, the keys in
    blocks with an online softmax, the relative position bias (and shift mask) read from the
    ``[groups*heads, N, N]`` table of ``rmbg20_fast._attention_bias``. Built for Swin's small
    windows (144 tokens, head size 32), where a general attention kernel's tiles are mostly
    padding.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a PyTorch build without Triton (no CUDA): the references run
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``x``: a CUDA tensor of FP16 or BF16, with Triton."""
    return triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def takes_attention(qkv: torch.Tensor, heads: int) -> bool:
    """Whether :func:`window_attention` runs its kernel on this ``qkv`` (else the reference)."""
    return available(qkv) and qkv.shape[-1] // 3 // heads in HEAD_SIZES


def _use_kernel(x: torch.Tensor, kernel: bool | None) -> bool:
    """``kernel`` if given (True runs Triton on any device: its interpreter on the CPU),
    else whether :func:`available`."""
    return available(x) if kernel is None else kernel


# --- PyTorch versions -------------------------------------------------------------------------


def ln_windows_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, sources: torch.Tensor
) -> torch.Tensor:
    """``layer_norm(x)`` gathered into window order: ``[B, P, C]`` for ``x`` ``[B, L, C]`` and
    ``sources`` ``[P]`` (the token each windowed position reads, -1 for padding: zeros)."""
    batch, tokens, channels = x.shape
    normed = F.layer_norm(x, (channels,), weight, bias, eps)
    padded = torch.cat([normed, normed.new_zeros(batch, 1, channels)], dim=1)
    return padded.index_select(1, torch.where(sources >= 0, sources, tokens))


def unwindow_residual_ln_reference(
    x: torch.Tensor,
    attended: torch.Tensor,
    from_windows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + attended[from_windows]`` (per frame); returns ``(s + out_bias,
    layer_norm(s))``, both ``[B, L, C]``."""
    batch, _, channels = x.shape
    total = x + attended.reshape(batch, -1, channels).index_select(1, from_windows)
    return total + out_bias, F.layer_norm(total, (channels,), weight, bias, eps)


def window_attention_reference(
    qkv: torch.Tensor, bias: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Attention per window from ``qkv`` ``[windows, N, 3C]`` with ``bias`` ``[1,
    groups*heads, N, N]`` (window ``w`` uses group ``w % groups``): ``[windows, N, C]``."""
    windows, tokens, triple = qkv.shape
    groups = bias.shape[1] // heads
    q, k, v = qkv.view(windows // groups, groups, tokens, 3, heads, -1).permute(3, 0, 1, 4, 2, 5)
    scores = (q.float() * scale) @ k.float().transpose(-1, -2)
    scores = scores + bias.view(1, groups, heads, tokens, tokens).float()
    out = scores.softmax(-1) @ v.float()  # [B, groups, heads, N, D]
    return out.permute(0, 1, 3, 2, 4).reshape(windows, tokens, triple // 3).to(qkv.dtype)


# --- Triton kernels ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _row_block(rows, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's rows and the channel columns, each with its bounds."""
        row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_C)
        return row, col, row < rows, col < channels

    @triton.jit
    def _layer_norm(x, weight_ptr, bias_ptr, col, in_cols, channels, eps):
        """Rows of ``x`` (FP32, columns past ``channels`` zero) layer-normed, affine."""
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(in_cols[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
        w = tl.load(weight_ptr + col, mask=in_cols, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + col, mask=in_cols, other=0.0).to(tl.float32)
        return centred * rstd[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _ln_windows_kernel(
        x_ptr,
        weight_ptr,
        bias_ptr,
        sources_ptr,
        out_ptr,
        rows,
        positions,
        tokens,
        channels,
        eps,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row, col, in_rows, in_cols = _row_block(rows, channels, BLOCK_R, BLOCK_C)
        frame = row // positions
        source = tl.load(sources_ptr + row % positions, mask=in_rows, other=-1)
        valid = in_rows & (source >= 0)
        src = (frame.to(tl.int64) * tokens + source) * channels
        x = tl.load(
            x_ptr + src[:, None] + col[None, :],
            mask=valid[:, None] & in_cols[None, :],
            other=0.0,
        ).to(tl.float32)
        y = _layer_norm(x, weight_ptr, bias_ptr, col, in_cols, channels, eps)
        y = tl.where(valid[:, None], y, 0.0)
        dst = row.to(tl.int64) * channels
        tl.store(
            out_ptr + dst[:, None] + col[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=in_rows[:, None] & in_cols[None, :],
        )

    @triton.jit
    def _unwindow_kernel(
        x_ptr,
        attended_ptr,
        from_ptr,
        weight_ptr,
        bias_ptr,
        out_bias_ptr,
        residual_ptr,
        normed_ptr,
        rows,
        tokens,
        positions,
        channels,
        eps,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row, col, in_rows, in_cols = _row_block(rows, channels, BLOCK_R, BLOCK_C)
        mask = in_rows[:, None] & in_cols[None, :]
        frame = row // tokens
        position = tl.load(from_ptr + row % tokens, mask=in_rows, other=0)
        src = (frame.to(tl.int64) * positions + position) * channels
        dst = row.to(tl.int64) * channels
        x = tl.load(x_ptr + dst[:, None] + col[None, :], mask=mask, other=0.0)
        a = tl.load(attended_ptr + src[:, None] + col[None, :], mask=mask, other=0.0)
        # the sum rounded to the tensors' dtype, as the published block's ``x + attn`` is
        total = (x + a).to(tl.float32)
        out_bias = tl.load(out_bias_ptr + col, mask=in_cols, other=0.0).to(tl.float32)
        tl.store(
            residual_ptr + dst[:, None] + col[None, :],
            (total + out_bias[None, :]).to(residual_ptr.dtype.element_ty),
            mask=mask,
        )
        y = _layer_norm(total, weight_ptr, bias_ptr, col, in_cols, channels, eps)
        tl.store(
            normed_ptr + dst[:, None] + col[None, :],
            y.to(normed_ptr.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _window_attention_kernel(
        qkv_ptr,
        bias_ptr,
        out_ptr,
        tokens,
        heads,
        groups,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        window_head = tl.program_id(0)
        window = window_head // heads
        head = window_head % heads
        group = window % groups
        channels = heads * HEAD_DIM
        row = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        dim = tl.arange(0, HEAD_DIM)
        in_rows = row < tokens
        base = window.to(tl.int64) * tokens * 3 * channels + head * HEAD_DIM
        q = tl.load(
            qkv_ptr + base + row[:, None] * (3 * channels) + dim[None, :],
            mask=in_rows[:, None],
            other=0.0,
        )
        bias_base = (group * heads + head).to(tl.int64) * tokens * tokens
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for start in range(0, tokens, BLOCK_N):
            key = start + tl.arange(0, BLOCK_N)
            in_keys = key < tokens
            k = tl.load(
                qkv_ptr + base + channels + key[:, None] * (3 * channels) + dim[None, :],
                mask=in_keys[:, None],
                other=0.0,
            )
            v = tl.load(
                qkv_ptr + base + 2 * channels + key[:, None] * (3 * channels) + dim[None, :],
                mask=in_keys[:, None],
                other=0.0,
            )
            b = tl.load(
                bias_ptr + bias_base + row[:, None] * tokens + key[None, :],
                mask=in_rows[:, None] & in_keys[None, :],
                other=0.0,
            ).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale + b
            s = tl.where(in_keys[None, :], s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, axis=1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        acc = acc / total[:, None]
        out = window.to(tl.int64) * tokens * channels + head * HEAD_DIM
        tl.store(
            out_ptr + out + row[:, None] * channels + dim[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=in_rows[:, None],
        )


def _on(x: torch.Tensor) -> Any:
    """The CUDA device of ``x`` made current around a launch (Triton launches on the current
    device and its current stream); nothing on the CPU (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rows_block(channels: int) -> tuple[int, int, int]:
    """Rows a program, padded channels and warps for a row-wise kernel of this width."""
    block_c = triton.next_power_of_2(channels)
    return max(1, 4096 // block_c), block_c, 8 if block_c >= 2048 else 4


#: Head sizes the attention kernel takes (a power of two its matrix products can tile).
HEAD_SIZES = (16, 32, 64, 128)
#: The attention kernel's tiles (query rows, key rows a step) and warps; set by
#: ``benchmarks.window_attention`` on an H200 (docs/benchmarks.md).
ATTENTION_TILES: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}


def ln_windows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    sources: torch.Tensor,
    kernel: bool | None = None,
) -> torch.Tensor:
    """See :func:`ln_windows_reference`; the Triton kernel on a CUDA tensor."""
    if not _use_kernel(x, kernel):
        return ln_windows_reference(x, weight, bias, eps, sources)
    batch, tokens, channels = x.shape
    positions = sources.shape[0]
    x = x.contiguous()
    out = x.new_empty(batch, positions, channels)
    block_r, block_c, warps = _rows_block(channels)
    rows = batch * positions
    with _on(x):
        _ln_windows_kernel[(triton.cdiv(rows, block_r),)](
            x, weight, bias, sources, out, rows, positions, tokens, channels, eps,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return out


def unwindow_residual_ln(
    x: torch.Tensor,
    attended: torch.Tensor,
    from_windows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_bias: torch.Tensor,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`unwindow_residual_ln_reference`; the Triton kernel on a CUDA tensor."""
    if not _use_kernel(x, kernel):
        return unwindow_residual_ln_reference(
            x, attended, from_windows, weight, bias, eps, out_bias
        )
    batch, tokens, channels = x.shape
    x, attended = x.contiguous(), attended.contiguous()
    positions = attended.numel() // (batch * channels)
    residual, normed = torch.empty_like(x), torch.empty_like(x)
    block_r, block_c, warps = _rows_block(channels)
    rows = batch * tokens
    with _on(x):
        _unwindow_kernel[(triton.cdiv(rows, block_r),)](
            x, attended, from_windows, weight, bias, out_bias, residual, normed,
            rows, tokens, positions, channels, eps,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return residual, normed


def window_attention(
    qkv: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    scale: float,
    tiles: dict[str, Any] | None = None,
    kernel: bool | None = None,
) -> torch.Tensor:
    """See :func:`window_attention_reference`; the Triton kernel on a CUDA tensor whose
    head size it takes (``tiles`` overrides :data:`ATTENTION_TILES`, for the benchmark that
    chose them)."""
    windows, tokens, triple = qkv.shape
    head_dim = triple // 3 // heads
    if not (_use_kernel(qkv, kernel) and head_dim in HEAD_SIZES):
        return window_attention_reference(qkv, bias, heads, scale)
    qkv, bias = qkv.contiguous(), bias.contiguous()
    out = qkv.new_empty(windows, tokens, triple // 3)
    config = {**ATTENTION_TILES, **(tiles or {})}
    grid = (windows * heads, triton.cdiv(tokens, config["BLOCK_M"]))
    with _on(qkv):
        _window_attention_kernel[grid](
            qkv, bias, out, tokens, heads, bias.shape[1] // heads, scale, HEAD_DIM=head_dim,
            **config,
        )  # fmt: skip
    return out
