"""The fast path's Triton kernels (``segmentation.models.rmbg20_kernels``) on the CPU, under
Triton's interpreter, against their PyTorch versions and, in one published Swin block, against
the published code.

The interpreter is chosen when a kernel is defined (``TRITON_INTERPRET=1`` before the module
is imported), so each check runs in a fresh Python process. The GPU tests run the same kernels
compiled, on the model's shapes (tests/gpu/test_fp16_gpu.py).
"""

from __future__ import annotations

import pytest

from tests.conftest import RMBG_ARCH_DIR
from tests.interpreted import interpreted as _interpreted

pytest.importorskip("triton")


GEOMETRY = """
import json, torch
from segmentation.models import rmbg20_kernels as K
from segmentation.models.rmbg20_fast import _shift_mask

torch.manual_seed(0)
batch, side, window, channels, heads = 2, 20, 12, 64, 2   # padded 20 -> 24: 4 windows
padded, tokens = 24, 144
shift = window // 2
rows = (torch.arange(padded) + shift) % padded
grid = (rows[:, None] * padded + rows[None, :]).view(2, window, 2, window)
to_windows = grid.permute(0, 2, 1, 3).reshape(-1)
inverse = torch.empty_like(to_windows)
inverse[to_windows] = torch.arange(padded * padded)
from_windows = inverse.view(padded, padded)[:side, :side].reshape(-1)
r, c = to_windows // padded, to_windows % padded
sources = torch.where((r < side) & (c < side), r * side + c, -1)
"""


def test_the_kernels_compute_what_their_pytorch_versions_do() -> None:
    """A shifted, padded geometry of 144-token windows: the attention's keys in five blocks
    of 32 (the last one partly outside the window), windows folded into the bias's groups;
    padding positions zero after the first layer norm."""
    result = _interpreted(
        GEOMETRY
        + """
x = torch.randn(batch, side * side, channels)
w, b, out_bias = torch.randn(channels), torch.randn(channels), torch.randn(channels)
got = K.ln_windows(x, w, b, 1e-5, sources, kernel=True)
want = K.ln_windows_reference(x, w, b, 1e-5, sources)
padding = got[:, sources < 0]
attended = torch.randn(batch * 4, tokens, channels)
res, normed = K.unwindow_residual_ln(x, attended, from_windows, w, b, 1e-5, out_bias, kernel=True)
res_want, normed_want = K.unwindow_residual_ln_reference(
    x, attended, from_windows, w, b, 1e-5, out_bias
)
qkv = torch.randn(batch * 4, tokens, 3 * channels).half()
bias = torch.randn(1, heads, tokens, tokens)
bias = (bias + _shift_mask(padded, padded, window, shift, torch.device("cpu")).unsqueeze(1))
bias = bias.reshape(1, -1, tokens, tokens).half()
att = K.window_attention(qkv, bias, heads, 0.18, kernel=True)
att_want = K.window_attention_reference(qkv.float(), bias.float(), heads, 0.18)
print(json.dumps({
    "ln": float((got - want).abs().max()),
    "padding": float(padding.abs().max()),
    "padding_count": int((sources < 0).sum()),
    "residual": float((res - res_want).abs().max()),
    "normed": float((normed - normed_want).abs().max()),
    "attention": float((att.float() - att_want).abs().max()),
    "attention_dtype": str(att.dtype),
    "attention_scale": float(att_want.abs().max()),
}))
"""
    )
    assert result["padding_count"] == 24 * 24 - 20 * 20
    assert result["padding"] == 0.0
    assert result["ln"] < 1e-5
    assert result["residual"] < 1e-5 and result["normed"] < 1e-5
    assert result["attention_dtype"] == "torch.float16"
    assert result["attention_scale"] > 0.5  # outputs of a size that a wrong sum would move
    assert result["attention"] < 4e-3  # FP16 in and out, FP32 inside


needs_arch = pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)


@needs_arch
def test_a_published_swin_block_through_the_kernels_gives_its_own_output() -> None:
    """A shifted block of the published backbone's first stage (192 channels, 6 heads), its
    ``forward`` replaced by the ``fuse`` and ``attn`` steps' kernels, against the published
    ``forward`` on the same input, at a size that pads (20x20 tokens to 24x24)."""
    result = _interpreted(
        GEOMETRY
        + f"""
from segmentation.models import rmbg20_fast
from segmentation.models.rmbg20_segmentor import build_model
rmbg20_fast.rmbg20_kernels.available = lambda t: True  # the kernels on the CPU
torch.manual_seed(0)
model = build_model({str(RMBG_ARCH_DIR)!r}, load_weights=False).eval()
layer = model.bb.layers[0]
block = layer.blocks[1]
assert block.shift_size == shift and block.window_size == window
with torch.no_grad():  # every parameter its own values: a swapped norm or bias would show
    for name, param in block.named_parameters():
        if "weight" not in name or "norm" in name:
            param.normal_(0.0, 0.5 if "norm" not in name else 1.0)
x = torch.randn(batch, side * side, block.norm1.normalized_shape[0])
attn_mask = rmbg20_fast._shift_mask(padded, padded, window, shift, x.device)
with torch.no_grad():
    block.H, block.W = side, side
    want = type(block).forward(block, x, attn_mask)
assert rmbg20_fast.optimize(block, ("fuse", "attn")) == ("sdpa", "windows", "fuse", "attn")
x_grad = x.clone().requires_grad_()
block.H, block.W = side, side
with_grad = block(x_grad, None)  # autograd on: the plain body, whose graph backward can use
with_grad.sum().backward()
with torch.inference_mode():
    block.H, block.W = side, side
    got = block(x, None)
print(json.dumps({{
    "diff": float((got - want).abs().max()),
    "scale": float(want.abs().max()),
    "grad_diff": float((with_grad.detach() - want).abs().max()),
    "grad_finite": bool(x_grad.grad is not None and x_grad.grad.isfinite().all()),
}}))
"""
    )
    assert result["scale"] > 1.0
    assert result["diff"] < 1e-4
    assert result["grad_finite"] and result["grad_diff"] < 1e-4


@needs_arch
def test_each_step_asks_for_what_it_reads() -> None:
    """``fuse`` alone brings the window plan and the attention that takes its bias; the
    ``attn`` kernel is not named where it cannot run (here, on the CPU); compiled blocks
    replace both."""
    import torch

    from segmentation.models import rmbg20_fast
    from segmentation.models.rmbg20_segmentor import build_model

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(RMBG_ARCH_DIR, load_weights=False).eval()

    fused = model()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = fused(x)[-1]
        assert rmbg20_fast.optimize(fused, ("fuse",)) == ("sdpa", "windows", "fuse")
        torch.testing.assert_close(fused(x)[-1], expected, atol=1e-5, rtol=1e-4)
    assert rmbg20_fast.optimize(model(), ("attn",)) == ("sdpa",)
    compiled = rmbg20_fast.optimize(model(), ("windows", "fuse", "attn", "compile"))
    assert compiled == ("sdpa", "windows", "compile")


@needs_arch
def test_an_int8_fc2_adds_into_the_residual_with_its_weight_cast_back() -> None:
    """USE_INT8's layers (torchao's tensors, on the CPU) through the ``fuse`` step: the MLP's
    second product adds into the residual with the INT8 weight cast back to the activations'
    dtype, and the path gives what the same quantized model gives without the step."""
    import copy

    import torch

    from segmentation.models import rmbg20_fast
    from segmentation.models.rmbg20_segmentor import build_model
    from segmentation.quantize import quantize_linears

    torch.manual_seed(0)
    model = build_model(RMBG_ARCH_DIR, load_weights=False).eval()
    assert quantize_linears(model, "int8", torch.device("cpu"))
    fc2 = model.bb.layers[0].blocks[0].mlp.fc2
    cast_back = rmbg20_fast._product_weight(fc2, torch.float32)
    assert cast_back is not None and type(cast_back) is torch.Tensor
    assert cast_back.dtype == torch.float32 and cast_back.shape == fc2.weight.shape
    torch.testing.assert_close(cast_back, fc2.weight.dequantize(torch.float32))
    plain, fused = copy.deepcopy(model), model
    assert rmbg20_fast.optimize(plain, ("sdpa", "windows")) == ("sdpa", "windows")
    assert rmbg20_fast.optimize(fused, ("fuse",)) == ("sdpa", "windows", "fuse")
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected, got = plain(x)[-1], fused(x)[-1]
    assert expected.std() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
