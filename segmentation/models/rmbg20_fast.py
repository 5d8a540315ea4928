"""A faster inference path for the published RMBG-2.0 code (BiRefNet, Swin-L), set up at load time.

The model's own code (birefnet.py) stays untouched: :func:`optimize` replaces the ``forward``
of the loaded module *instances* whose classes it recognises, and leaves every other module
(and any class it does not know, such as the test stand-in's) as it was. Each step gives the
same function of the weights as the published code, up to floating-point rounding; the
tests compare each one with the eager FP32 model on the same weights.

Where the time went (``torch.profiler``, FP16, batch 8, H100, see docs/benchmarks.md): bilinear
upsampling 14%, copies (~580 per forward: Swin window partition/reverse, rolls, padding) 14%,
elementwise adds 12%, softmax 6%: memory traffic around a quarter of matrix math. The steps:

``sdpa``
    Swin window attention through ``F.scaled_dot_product_attention`` (one fused kernel
    instead of ``q@k``, ``+bias``, ``+mask``, softmax and ``@v``, each a pass over the
    ``[windows, heads, 144, 144]`` scores). The relative position bias is gathered once per
    module and dtype instead of at every call; for shifted windows it is added to the shift
    mask once, and the windows are folded into the head dimension (``[B, nW*nH, N, D]``) so
    that one ``[1, nW*nH, N, N]`` bias broadcasts over the batch with a zero stride.
``windows``
    Swin blocks move tokens into and out of windows with one precomputed gather each way
    (pad + roll + partition, and reverse + roll + crop, were five or six copies), and the
    shifted-window mask is built once per layer size instead of at every call.
``decoder``
    The decoder's image patches come from one reshape instead of a Python loop of thousands
    of ``split``/``cat`` per frame, their ``F.interpolate`` to the size they already have
    (an exact identity) is skipped, and the output 1x1 convolution is applied before the
    last upsampling rather than after it: both are linear and bilinear weights sum to one,
    so ``conv1x1(up(a)) == up(conv1x1(a))``; this upsamples 1 channel to 1024x1024 instead of
    192 (400 MB of FP16 writes per frame) and folds the 48-channel input branch into its
    last convolution.
``deform``
    The decoder's deformable convolutions (``DeformableConv2d``) through
    :func:`segmentation.models.deform_conv.deform_conv2d` instead of torchvision's kernel,
    which runs on the legacy default stream: off the current stream it races other work, and
    CUDA-graph capture does not record it, so replays reused the capture's columns. Without
    this step the model is not captured in graphs (:func:`graph_blocker`). It also bounds the
    sampling buffer (torchvision's columns take 6.6 GB in FP16 at batch 16).
``compile``
    Optional (``RMBG_COMPILE=blocks``, or ``true``): ``torch.compile`` (Inductor) of the Swin
    block body, one function shared by every block, so each distinct geometry compiles once,
    with the batch size symbolic; a single frame and an FP32 recompute run the eager body (a
    batch of 1 would trace and compile a second graph of every geometry: half of what a
    replica compiles, or loads from an artifact, at start-up, for calls bound by their
    launches).
``compile-decoder``
    Optional (``RMBG_COMPILE=decoder``): ``torch.compile`` of the whole decoder (its
    upsampling, gradient attention, lateral sums and the deformable convolutions' sampling),
    static shapes, one graph per batch size it is compiled for (:func:`compile_decoder_for`;
    a segmentor with batch buckets compiles it for the largest only, the batches a loaded
    replica runs); the folded output head is fetched before the compiled body, which would
    break its graph there. Other sizes, a single frame and an FP32 recompute run it eagerly.
    Compiled artifacts (:mod:`segmentation.compile_cache`) hold it like the blocks. With the
    batch symbolic it gained nothing on an H200 (docs/benchmarks.md).
``resample``
    Bilinear resampling (the encoder's half-size backbone pass brought to the full pass's
    sizes, the context features brought to the deepest stage's, the decoder's 2x steps)
    through PyTorch's channels-last kernel: its NCHW kernel gives each thread one output
    position and loops over batch and channels, so a 32x32 output of 16 x 384 channels runs
    on 1,024 threads (3.4 ms a frame of 20 at batch 16 on an H200, for a few hundred MB of
    traffic). The same arithmetic; the layout is converted in and out around the call.
    The encoder's forward (``forward_enc``, eval mode) is replaced for that, and a decoder
    compiled by ``compile-decoder`` keeps the plain call (Inductor writes its own kernel).
``fuse``
    The Swin blocks' memory-bound glue in two Triton kernels (:mod:`rmbg20_kernels`): the
    first layer norm written straight into window order (padding and shift included), and
    the move back to token order with the residual sum and the second layer norm; the
    MLP's second matrix product adds into the residual in place (``addmm_``), the ``fc2``
    bias already in it. Five round trips of the block's tokens through memory become two
    (2.9 -> 0.7 ms a frame at batch 16 on an H200). An INT8 ``fc2`` adds into the residual
    the same way with its weight cast back; an FP8 one keeps its own product and bias.
``attn``
    Window attention in a Triton kernel made for Swin's windows: q, k and v read where the
    ``qkv`` projection wrote them and the output written in token order, the keys in blocks
    of 32 (144 tokens, head size 32, where cuDNN's attention tiles of 64x128 are mostly
    padding): 3.8 -> 1.1 ms a frame at batch 16 on an H200. Not applied (nor named in the
    path) where it cannot run: the CPU, FP32 weights, heads of other sizes; an FP32
    recompute keeps ``scaled_dot_product_attention``.

``compile`` (the blocks) replaces ``fuse`` and ``attn``: Inductor writes its own kernels for
the block body. On the CPU ``fuse`` runs the kernels' PyTorch versions (the same arithmetic).
With autograd on or in training mode both steps give way to the plain body and attention:
the kernels record no graph for a backward pass.
"""

from __future__ import annotations

import functools
import logging
import math
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from segmentation import quantize
from segmentation.models import rmbg20_kernels
from segmentation.models.deform_conv import deform_conv2d

logger = logging.getLogger(__name__)

SDPA = "sdpa"
WINDOWS = "windows"
DECODER = "decoder"
DEFORM = "deform"
COMPILE = "compile"
COMPILE_DECODER = "compile-decoder"
RESAMPLE = "resample"
FUSE = "fuse"
ATTN = "attn"
#: The steps :func:`optimize` applies unless told otherwise (compile is opt-in: see
#: docs/benchmarks.md for its cold start).
DEFAULT_STEPS: tuple[str, ...] = (SDPA, WINDOWS, DECODER, DEFORM, RESAMPLE, FUSE, ATTN)
ALL_STEPS: tuple[str, ...] = (
    SDPA,
    WINDOWS,
    DECODER,
    DEFORM,
    RESAMPLE,
    FUSE,
    ATTN,
    COMPILE,
    COMPILE_DECODER,
)
#: The steps that compile, each with the part of ``RMBG_COMPILE`` that names it; a compiled
#: artifact holds what they compile.
COMPILED_STEPS: dict[str, str] = {COMPILE: "blocks", COMPILE_DECODER: "decoder"}

_Cache = dict[tuple[Any, ...], Any]


def optimize(model: torch.nn.Module, steps: Iterable[str] = DEFAULT_STEPS) -> tuple[str, ...]:
    """Apply the named steps to ``model``'s recognised modules; return those that applied.

    Call it after the weights are loaded and the model has its serving dtype: derived
    tensors (position biases, folded convolutions) are built lazily from the live weights
    and cached for that dtype only (an FP32 recompute builds them per call, uncached).
    """
    wanted = set(steps)
    unknown = wanted - set(ALL_STEPS)
    if unknown:
        raise ValueError(f"unknown optimization steps {sorted(unknown)}; known: {ALL_STEPS}")
    if COMPILE in wanted:
        wanted -= {FUSE, ATTN}  # Inductor writes its own kernels for the block body
    if FUSE in wanted:
        wanted.add(WINDOWS)  # the fused kernels read the block's window plan
    if WINDOWS in wanted or COMPILE in wanted or ATTN in wanted:
        wanted.add(SDPA)  # the window gather hands the attention its prebuilt bias
    if ATTN in wanted and not _kernels_run(model):
        wanted.discard(ATTN)  # the kernel runs on CUDA in FP16/BF16 only: not named where not
    dtype = next(model.parameters()).dtype
    applied: dict[str, int] = {step: 0 for step in ALL_STEPS}
    decoders: list[torch.nn.Module] = []
    for module in model.modules():
        kind = type(module).__name__
        if SDPA in wanted and kind == "WindowAttention" and _is_swin_attention(module):
            head = int(cast(Any, module).qkv.in_features) // int(cast(Any, module).num_heads)
            kernel = ATTN in wanted and head in rmbg20_kernels.HEAD_SIZES
            _patch(module, _window_attention, _fast_dtype=dtype, _fast_kernel=kernel)
            applied[SDPA] += 1
            applied[ATTN] += kernel
        elif WINDOWS in wanted and kind == "SwinTransformerBlock" and _is_swin_block(module):
            fuse = FUSE in wanted and _is_fusable_block(module)
            _patch(
                module,
                _swin_block,
                _fast_dtype=dtype,
                _fast_body=_fused_block_body if fuse else _swin_block_body,
            )
            applied[WINDOWS] += 1
            applied[FUSE] += fuse
        elif WINDOWS in wanted and kind == "BasicLayer" and _is_swin_layer(module):
            _patch(module, _basic_layer)
        elif DECODER in wanted and kind == "Decoder" and _is_birefnet_decoder(module):
            _patch(module, _decoder, _fast_dtype=dtype)
            decoders.append(module)
            applied[DECODER] += 1
        elif DEFORM in wanted and kind == "DeformableConv2d" and _is_deformable_conv(module):
            _patch(module, _deformable_conv, _fast_deform=True)
            applied[DEFORM] += 1
        elif RESAMPLE in wanted and kind == "BiRefNet" and _is_birefnet(module):
            setattr(module, "forward_enc", types.MethodType(_encoder, module))  # noqa: B010
            applied[RESAMPLE] += 1
    if RESAMPLE in wanted and applied[RESAMPLE]:
        for module in decoders:
            module.__dict__["_fast_up"] = _up_channels_last
    if COMPILE in wanted and applied[WINDOWS]:
        compiled = _compiled_block_body()
        for module in model.modules():
            if getattr(module, "_fast_body", None) is _swin_block_body:
                _patch(module, _swin_block, _fast_body=compiled)
        applied[COMPILE] = applied[WINDOWS]
    if COMPILE_DECODER in wanted and decoders:
        compiled_decoder = _compiled_decoder()
        for module in decoders:
            _patch(module, _decoder, _fast_compiled=compiled_decoder)
        applied[COMPILE_DECODER] = len(decoders)
    done = tuple(step for step in ALL_STEPS if applied[step])
    logger.info("RMBG-2.0 fast path: %s", {k: v for k, v in applied.items() if v} or "none")
    return done


def _kernels_run(model: torch.nn.Module) -> bool:
    """Whether the ``attn`` kernel runs on ``model``'s weights (CUDA, FP16 or BF16, Triton)."""
    return rmbg20_kernels.available(next(model.parameters()))


def path_name(steps: Iterable[str], graphs: bool) -> str:
    """How ``/v1/models`` names the path that runs: ``eager``, or the steps joined by ``+``."""
    names = [*steps, *(["graphs"] if graphs else [])]
    return "+".join(names) if names else "eager"


def graph_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model`` must not be captured in a CUDA graph, or None: a published
    ``DeformableConv2d`` still calling torchvision's kernel (see the ``deform`` step)."""
    for name, module in model.named_modules():
        if type(module).__name__ == "DeformableConv2d" and not hasattr(module, "_fast_deform"):
            return (
                f"{name} calls torchvision's deform_conv2d, which CUDA-graph capture does not "
                "record (it runs on the legacy default stream); enable the 'deform' step"
            )
    return None


def _patch(module: torch.nn.Module, forward: Callable[..., Any], **attributes: Any) -> None:
    """Give this instance (not its class) a new ``forward`` and the attributes it reads."""
    attributes["forward"] = types.MethodType(forward, module)
    for name, value in attributes.items():
        setattr(module, name, value)


# --- recognising the published modules --------------------------------------------------------


def _is_swin_attention(module: torch.nn.Module) -> bool:
    return all(
        hasattr(module, name)
        for name in ("relative_position_bias_table", "relative_position_index", "qkv", "proj")
    )


def _is_swin_block(module: torch.nn.Module) -> bool:
    attn = getattr(module, "attn", None)
    return (
        attn is not None
        and _is_swin_attention(attn)
        and all(hasattr(module, n) for n in ("norm1", "norm2", "mlp", "window_size", "shift_size"))
    )


def _is_swin_layer(module: torch.nn.Module) -> bool:
    blocks = getattr(module, "blocks", None)
    return blocks is not None and all(
        type(b).__name__ == "SwinTransformerBlock" and _is_swin_block(b) for b in blocks
    )


def _is_birefnet_decoder(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (
        config is not None
        and getattr(config, "dec_ipt", False)
        and getattr(module, "split", False)
        and getattr(config, "ms_supervision", False)
        and getattr(config, "out_ref", False)
        and hasattr(module, "get_patches_batch")
        and len(getattr(module, "conv_out1", ())) == 1
    )


def _is_birefnet(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (
        config is not None
        and hasattr(module, "forward_enc")
        and hasattr(module, "bb")
        and getattr(config, "bb", None) not in ("vgg16", "vgg16bn", "resnet50")
        and getattr(config, "mul_scl_ipt", None) in ("", "add", "cat")
        and isinstance(getattr(config, "cxt", None), list | tuple)
    )


def _is_deformable_conv(module: torch.nn.Module) -> bool:
    regular = getattr(module, "regular_conv", None)
    return (
        isinstance(getattr(module, "offset_conv", None), torch.nn.Conv2d)
        and isinstance(getattr(module, "modulator_conv", None), torch.nn.Conv2d)
        and isinstance(regular, torch.nn.Conv2d)
        and regular.groups == 1
        and tuple(regular.dilation) == (1, 1)
        and hasattr(module, "padding")
        and hasattr(module, "stride")
    )


def _cached(module: torch.nn.Module, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` cached on ``module`` under ``key`` when ``key[0]`` is the module's serving
    dtype; built afresh otherwise (an FP32 recompute must not leave FP32 copies behind)."""
    if key[0] != getattr(module, "_fast_dtype", None):
        return build()
    cache: _Cache = module.__dict__.setdefault("_fast_cache", {})
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
    return value


# --- sdpa: window attention -------------------------------------------------------------------


def _position_bias(attn: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The relative position bias ``[nH, N, N]`` (what the published forward gathers per call)."""

    def build() -> torch.Tensor:
        n = attn.window_size[0] * attn.window_size[1]
        table = attn.relative_position_bias_table
        bias = table[attn.relative_position_index.reshape(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).to(device=device, dtype=dtype).contiguous()

    return _cached(attn, (dtype, device, "position"), build)


def _attention_bias(
    attn: Any, mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Position bias plus shift mask as one additive ``attn_mask``: ``[1, nH, N, N]``
    without a mask, ``[1, nW*nH, N, N]`` with one (windows folded into heads)."""
    bias = _position_bias(attn, dtype, device)
    if mask is None:
        return bias.unsqueeze(0)
    combined = bias.unsqueeze(0) + mask.to(dtype).unsqueeze(1)  # nW, nH, N, N
    return combined.reshape(1, -1, *combined.shape[-2:])


def _window_attention(
    self: Any,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``WindowAttention.forward`` through one fused attention kernel.

    ``mask`` is the published (0/-100) shift mask ``[nW, N, N]``; ``attn_bias`` instead is the
    bias prebuilt by :func:`_attention_bias` (the Swin block's fast path passes it).
    """
    if attn_bias is None:
        attn_bias = _attention_bias(self, mask, x.dtype, x.device)
    qkv = self.qkv(x)
    if (
        self.__dict__.get("_fast_kernel")
        and not (self.training or torch.is_grad_enabled())
        and rmbg20_kernels.takes_attention(qkv, self.num_heads)
    ):
        out = rmbg20_kernels.window_attention(qkv, attn_bias, self.num_heads, self.scale)
    else:
        out = windowed_attention(qkv, attn_bias, self.num_heads, self.scale)
    return self.proj_drop(self.proj(out))


def windowed_attention(
    qkv: torch.Tensor, attn_bias: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Attention of each window's tokens from their ``qkv`` projection ``[windows, N, 3C]``
    with the bias of :func:`_attention_bias` (windows folded into heads when it has a shift
    mask's ``nW`` groups): ``[windows, N, C]``, before the output projection."""
    windows, tokens, triple = qkv.shape
    channels = triple // 3
    groups = attn_bias.shape[1] // heads
    if groups == 1:
        q, k, v = qkv.view(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
        return out.transpose(1, 2).reshape(windows, tokens, channels)
    batch = windows // groups
    q, k, v = (
        qkv.view(batch, groups, tokens, 3, heads, -1)
        .permute(3, 0, 1, 4, 2, 5)
        .reshape(3, batch, groups * heads, tokens, -1)
        .unbind(0)
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    out = out.view(batch, groups, heads, tokens, -1).transpose(2, 3)
    return out.reshape(windows, tokens, channels)


# --- windows: Swin blocks ---------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPlan:
    """Where each token goes for one block geometry."""

    padded: tuple[int, int]  # Hp, Wp
    to_windows: torch.Tensor  # [Hp*Wp]: padded flat index of each windowed token
    from_windows: torch.Tensor  # [H*W]: windowed index of each original token
    bias: torch.Tensor  # attention bias, see _attention_bias
    sources: torch.Tensor  # [Hp*Wp]: original token at each windowed position, -1 padding


def _shift_mask(hp: int, wp: int, size: int, shift: int, device: torch.device) -> torch.Tensor:
    """The published shifted-window mask ``[nW, N, N]`` (0 / -100), as ``BasicLayer`` builds it."""
    img = torch.zeros((hp, wp), device=device)
    label = 0
    for h in (slice(0, -size), slice(-size, -shift), slice(-shift, None)):
        for w in (slice(0, -size), slice(-size, -shift), slice(-shift, None)):
            img[h, w] = label
            label += 1
    windows = img.view(hp // size, size, wp // size, size).permute(0, 2, 1, 3).reshape(-1, size**2)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def window_plan(block: Any, height: int, width: int, x: torch.Tensor) -> WindowPlan:
    size, shift = block.window_size, block.shift_size
    hp, wp = math.ceil(height / size) * size, math.ceil(width / size) * size

    def build() -> WindowPlan:
        device = x.device
        rows = (torch.arange(hp, device=device) + shift) % hp
        cols = (torch.arange(wp, device=device) + shift) % wp
        grid = rows[:, None] * wp + cols[None, :]  # padded index at each shifted position
        to_windows = grid.view(hp // size, size, wp // size, size).permute(0, 2, 1, 3).reshape(-1)
        inverse = torch.empty_like(to_windows)
        inverse[to_windows] = torch.arange(hp * wp, device=device)
        from_windows = inverse.view(hp, wp)[:height, :width].reshape(-1)
        mask = _shift_mask(hp, wp, size, shift, device) if shift > 0 else None
        bias = _attention_bias(block.attn, mask, x.dtype, device)
        row, col = to_windows // wp, to_windows % wp
        sources = torch.where((row < height) & (col < width), row * width + col, -1)
        return WindowPlan((hp, wp), to_windows, from_windows, bias, sources)

    return _cached(block, (x.dtype, x.device, height, width), build)


def _swin_block_body(
    block: Any,
    x: torch.Tensor,
    height: int,
    width: int,
    padded: tuple[int, int],
    to_windows: torch.Tensor,
    from_windows: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The arithmetic of ``SwinTransformerBlock.forward``, tokens moved by two gathers."""
    windows = window_tokens(block.norm1(x), height, width, padded, to_windows, block.window_size)
    attended = block.attn(windows, attn_bias=bias)
    x = x + block.drop_path(token_order(attended, x.shape[0], from_windows))
    return x + block.drop_path(block.mlp(block.norm2(x)))


def window_tokens(
    tokens: torch.Tensor,
    height: int,
    width: int,
    padded: tuple[int, int],
    to_windows: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """A block's normalised tokens ``[B, H*W, C]``, padded to whole windows and gathered
    window by window (the shift included): ``[B*nW, window*window, C]``."""
    batch, _, channels = tokens.shape
    hp, wp = padded
    if (hp, wp) != (height, width):
        tokens = F.pad(
            tokens.view(batch, height, width, channels), (0, 0, 0, wp - width, 0, hp - height)
        )
    windows = tokens.reshape(batch, hp * wp, channels).index_select(1, to_windows)
    return windows.view(-1, window * window, channels)


def token_order(windows: torch.Tensor, batch: int, from_windows: torch.Tensor) -> torch.Tensor:
    """:func:`window_tokens` undone on the attention's output: ``[B, H*W, C]``."""
    return windows.reshape(batch, -1, windows.shape[-1]).index_select(1, from_windows)


def _swin_block(self: Any, x: torch.Tensor, mask_matrix: Any = None) -> torch.Tensor:
    """``SwinTransformerBlock.forward``; the shift mask comes from the block's own plan."""
    height, width = self.H, self.W
    plan = window_plan(self, height, width, x)
    program = self.__dict__.get("_fast_program")
    if program is not None and x.dtype == self._fast_dtype:
        # an ahead-of-time compiled body (segmentation.models.rmbg20_blocks), when one
        # takes this geometry and batch size
        out = program(self, x, plan)
        if out is not None:
            return cast(torch.Tensor, out)
    body = self._fast_body
    if body is _fused_block_body:
        if x.dtype == self._fast_dtype and not (self.training or torch.is_grad_enabled()):
            return _fused_block_body(self, x, plan)
        # an FP32 recompute, training or autograd (the kernels keep no graph): the plain body
        body = _swin_block_body
    elif body is not _swin_block_body:
        if x.dtype != self._fast_dtype or x.shape[0] == 1:
            # an FP32 recompute of a few frames (never a compile mid-request), or a single
            # frame (Dynamo would trace its batch of 1 as a graph of its own): the eager body
            body = _swin_block_body
        else:
            # one compiled graph per block geometry for every batch size from 2
            torch._dynamo.maybe_mark_dynamic(x, 0)
    return body(self, x, height, width, plan.padded, plan.to_windows, plan.from_windows, plan.bias)


def _is_fusable_block(block: Any) -> bool:
    """Whether the ``fuse`` step takes this block: affine layer norms and an MLP of two
    biased linear layers around its activation, and nothing else but dropouts (the
    published Swin-L's)."""
    mlp = block.mlp
    parts = {name for name, child in mlp.named_children() if type(child) is not torch.nn.Dropout}
    return (
        parts == {"fc1", "act", "fc2"}
        and all(
            isinstance(norm, torch.nn.LayerNorm) and norm.weight is not None
            and norm.bias is not None and len(norm.normalized_shape) == 1
            for norm in (block.norm1, block.norm2)
        )
        and all(
            isinstance(linear, torch.nn.Linear) and linear.bias is not None
            for linear in (mlp.fc1, mlp.fc2)
        )
    )  # fmt: skip


def _fused_block_body(block: Any, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """``SwinTransformerBlock.forward`` (eval) through :mod:`rmbg20_kernels`: the first layer
    norm fused with the move into windows, the move back with the residual sum and the
    second layer norm, and the MLP's residual added by its second matrix product in place
    (the sum's buffer already holds the ``fc2`` bias)."""
    batch, tokens, channels = x.shape
    norm1, norm2, mlp = block.norm1, block.norm2, block.mlp
    weight = _product_weight(mlp.fc2, x.dtype)
    # an FP8 fc2 (USE_FP8) runs its own product, bias included
    out_bias = (
        mlp.fc2.bias
        if weight is not None
        else _cached(block, (x.dtype, x.device, "no bias"), lambda: torch.zeros_like(mlp.fc2.bias))
    )
    windows = rmbg20_kernels.ln_windows(x, norm1.weight, norm1.bias, norm1.eps, plan.sources)
    attended = block.attn(windows.view(-1, block.window_size**2, channels), attn_bias=plan.bias)
    residual, normed = rmbg20_kernels.unwindow_residual_ln(
        x, attended, plan.from_windows, norm2.weight, norm2.bias, norm2.eps, out_bias
    )
    hidden = mlp.act(mlp.fc1(normed)).view(batch * tokens, -1)
    residual = residual.view(batch * tokens, channels)
    out = (
        residual.addmm_(hidden, weight.t())
        if weight is not None
        else residual.add_(mlp.fc2(hidden))
    )
    return out.view(batch, tokens, channels)


def _product_weight(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    """``linear``'s weight as a plain tensor in ``dtype`` for a product of its own: the
    weight itself, or an INT8 one cast back (``USE_INT8``); None for FP8's (``USE_FP8``),
    whose product scales its input too."""
    if isinstance(linear, quantize.DequantizingLinear):
        return linear.weight_as(dtype)
    return linear.weight if type(linear.weight.data) is torch.Tensor else None


def _basic_layer(self: Any, x: torch.Tensor, H: int, W: int) -> tuple[Any, ...]:
    """``BasicLayer.forward`` without building the shift mask (each block has its own)."""
    for blk in self.blocks:
        blk.H, blk.W = H, W
        x = blk(x, None)
    if self.downsample is not None:
        return x, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2
    return x, H, W, x, H, W


def _compiled_block_body() -> Callable[..., torch.Tensor]:
    """``_swin_block_body`` through Inductor: one compiled graph per distinct block geometry
    (8 per backbone pass size), shared by every block of that geometry, with the batch size
    symbolic (:func:`_swin_block` marks it) so the service's batch buckets reuse it.

    Inductor keeps what it compiled on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under
    the system's temp directory): a process that finds the same graphs there loads them
    instead of compiling (docs/benchmarks.md has the cold and warm start-up times)."""
    return _inductor(_swin_block_body, dynamic=None)


def _inductor(body: Callable[..., Any], dynamic: bool | None) -> Callable[..., Any]:
    """``torch.compile`` of ``body``, with room for a graph per geometry and batch size.

    CPU kernels read the thread count when they run instead of being compiled for the
    process's: a Serve replica gets as many threads as its ``num_cpus`` (Ray sets
    ``OMP_NUM_THREADS``), the tool that builds a compiled artifact as many as its machine has,
    and Inductor keys its cached graphs by a thread count compiled in, so a replica missed
    every graph of an artifact built on the CPU."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    pickle_by_name()
    return torch.compile(body, dynamic=dynamic, options={"cpp.dynamic_threads": True})


def torch_attribute(name: str) -> Any:
    """``torch.<name>``: what a dtype or memory format in a graph's key is pickled as."""
    return getattr(torch, name)


def _by_name(value: torch.dtype | torch.memory_format) -> tuple[Any, tuple[str]]:
    return torch_attribute, (str(value).removeprefix("torch."),)


@functools.cache  # once a process: the wrapper goes on the class
def pickle_by_name() -> None:
    """Make Inductor's graph keys pickle dtypes and memory formats as ``torch.<name>``,
    whatever this process imported first.

    Inductor keys a compiled graph by its inputs' pickled metadata. Pickle names a memory
    format (and a dtype) by the first module in ``sys.modules`` through which its name
    reaches it: ``torch._utils`` in a plain process, but in a Ray worker a module imported
    before torch (Cython's ``cython.cimports.libc``, whose attributes import what they name)
    comes first. The keys then differed, and a Serve replica on a GPU missed every graph of
    an artifact built by the tool, compiling the decoder for minutes at start-up. Only the
    key's pickler (``FxGraphCachePickler``, AOTAutograd's derives from it) gets the
    reducers: its bytes are hashed, never unpickled, and every other pickle in the process
    (``torch.save``, Ray's) stays as torch writes it."""
    from torch._inductor.codecache import FxGraphCachePickler

    original = FxGraphCachePickler.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.dispatch_table[torch.dtype] = _by_name
        self.dispatch_table[torch.memory_format] = _by_name

    FxGraphCachePickler.__init__ = init  # type: ignore[method-assign]


# --- decoder ----------------------------------------------------------------------------------


def _patches(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``Decoder.get_patches_batch(x, like)`` as one reshape: the image cut into tiles of
    ``like``'s size, stacked on channels column by column (the published loop's order)."""
    batch, channels, height, width = x.shape
    h, w = like.shape[2:]
    rows, cols = height // h, width // w
    tiles = x.view(batch, channels, rows, h, cols, w).permute(0, 4, 2, 1, 3, 5)
    return tiles.reshape(batch, cols * rows * channels, h, w)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=True)


def _up_channels_last(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return resize(x, like.shape[2:])


def resize(x: torch.Tensor, size: Iterable[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` of an NCHW tensor,
    computed by the channels-last kernel and returned in NCHW (see the ``resample`` step).
    Inside a graph being compiled, and where a tensor is too large for that kernel's 32-bit
    indexing, the plain call."""
    size = tuple(size)
    largest = max(x.numel(), x.shape[0] * x.shape[1] * math.prod(size))
    if torch.compiler.is_compiling() or largest >= 2**31 - 1:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(nhwc, size=size, mode="bilinear", align_corners=True)
    return out.contiguous()


def _encoder(self: Any, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], None]:
    """``BiRefNet.forward_enc`` in eval mode (training runs the published code), its
    resampling through :func:`resize`."""
    if self.training:
        return cast(tuple[tuple[torch.Tensor, ...], None], type(self).forward_enc(self, x))
    features = tuple(self.bb(x))
    mode = self.config.mul_scl_ipt
    if mode in ("cat", "add"):
        height, width = x.shape[2:]
        half = self.bb(resize(x, (height // 2, width // 2)))
        merged = []
        for full, small in zip(features, half, strict=True):
            up = resize(small, full.shape[2:])
            merged.append(torch.cat([full, up], dim=1) if mode == "cat" else full + up)
        features = tuple(merged)
    x1, x2, x3, x4 = features
    if self.config.cxt:
        context = [resize(f, x4.shape[2:]) for f in (x1, x2, x3)][-len(self.config.cxt) :]
        x4 = torch.cat((*context, x4), dim=1)
    return (x1, x2, x3, x4), None


def _gradient_attention(stage: torch.Tensor, convs: Any, attn: Any) -> torch.Tensor:
    return stage * attn(convs(stage)).sigmoid()


def _output_head(self: Any, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``conv_out1`` split for the decoder's last stage: the weights that apply to the
    decoder features, and ``ipt_blk1.conv_out`` folded with the ones for the input branch."""

    def build() -> tuple[torch.Tensor, ...]:
        head = self.conv_out1[0]
        branch = self.ipt_blk1.conv_out
        weight = head.weight.double()[:, :, 0, 0]  # 1, Cdec + Cipt
        split = weight.shape[1] - branch.out_channels
        features_weight = head.weight[:, :split]
        w_ipt = weight[:, split:]  # 1, Cipt
        folded = torch.einsum("oc,cikl->oikl", w_ipt, branch.weight.double())
        bias = w_ipt @ branch.bias.double() + head.bias.double()
        return (
            features_weight.to(device=device, dtype=dtype).contiguous(),
            folded.to(device=device, dtype=dtype).contiguous(),
            bias.to(device=device, dtype=dtype),
        )

    return _cached(self, (dtype, device, "head"), build)


def _compiled_decoder() -> Callable[..., list[torch.Tensor]]:
    """:func:`_decoder_body` through Inductor, static shapes: one graph per batch size it
    runs at (:func:`compile_decoder_for`)."""
    return _inductor(_decoder_body, dynamic=False)


def compile_decoder_for(model: torch.nn.Module, batches: Iterable[int] | None) -> None:
    """The batch sizes ``model``'s compiled decoder runs at (None: every size from 2); other
    sizes run it uncompiled. A size compiles at its first call."""
    sizes = None if batches is None else frozenset(batches)
    for module in model.modules():
        if "_fast_compiled" in module.__dict__:
            module.__dict__["_fast_compiled_batches"] = sizes


def _decoder(self: Any, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """``Decoder.forward`` in eval mode (training runs the published code)."""
    if self.training:
        return type(self).forward(self, features)
    # The folded output head, fetched (or built and cached) here: a compiled body that
    # builds it into the module's cache would break its graph there (reading an attribute
    # set at load time, as the body does for ``_fast_up``, does not).
    head = _output_head(self, features[0].dtype, features[0].device)
    compiled = self.__dict__.get("_fast_compiled")
    if compiled is not None and features[0].dtype == self._fast_dtype and len(features[0]) > 1:
        batches = self.__dict__.get("_fast_compiled_batches")
        if batches is None or len(features[0]) in batches:
            return cast(list[torch.Tensor], compiled(self, features, head))
    return _decoder_body(self, features, head)


def _decoder_body(
    self: Any, features: list[torch.Tensor], head: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    x, x1, x2, x3, x4 = features
    up = self.__dict__.get("_fast_up", _up)  # the resample step's, when it applied
    x4 = torch.cat((x4, self.ipt_blk5(_patches(x, x4))), 1)
    p4 = self.decoder_block4(x4)
    m4 = self.conv_ms_spvn_4(p4)
    p4 = _gradient_attention(p4, self.gdt_convs_4, self.gdt_convs_attn_4)
    p3 = up(p4, x3) + self.lateral_block4(x3)
    p3 = torch.cat((p3, self.ipt_blk4(_patches(x, p3))), 1)
    p3 = self.decoder_block3(p3)
    m3 = self.conv_ms_spvn_3(p3)
    p3 = _gradient_attention(p3, self.gdt_convs_3, self.gdt_convs_attn_3)
    p2 = up(p3, x2) + self.lateral_block3(x2)
    p2 = torch.cat((p2, self.ipt_blk3(_patches(x, p2))), 1)
    p2 = self.decoder_block2(p2)
    m2 = self.conv_ms_spvn_2(p2)
    p2 = _gradient_attention(p2, self.gdt_convs_2, self.gdt_convs_attn_2)
    p1 = up(p2, x1) + self.lateral_block2(x1)
    p1 = torch.cat((p1, self.ipt_blk2(_patches(x, p1))), 1)
    p1 = self.decoder_block1(p1)
    # conv_out1(cat(up(p1), ipt_blk1(x))): the 1x1 convolution first, then the upsampling.
    features_weight, folded, bias = head
    logits = up(F.conv2d(p1, features_weight), x)
    logits = logits + F.conv2d(self.ipt_blk1.conv1(x), folded, bias, padding=1)
    return [m4, m3, m2, logits]


# --- deform: the decoder's deformable convolutions -------------------------------------------


def _deformable_conv(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``DeformableConv2d.forward`` with the same offsets, modulation and weights, sampled on
    the current stream."""
    offset = self.offset_conv(x)
    modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
    return deform_conv2d(
        x,
        offset,
        self.regular_conv.weight,
        self.regular_conv.bias,
        stride=self.stride,
        padding=self.padding,
        mask=modulator,
    )
