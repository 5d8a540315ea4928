import copy
import logging

import pytest
import torch

from segmentation import precision
from segmentation.models.rmbg20_loader import cast_attention_masks
from segmentation.precision import Precision, apply_precision, choose_precision


def test_cpu_runs_fp32_with_a_reason() -> None:
    chosen = choose_precision(torch.device("cpu"), use_fp16=True)
    assert chosen.dtype == torch.float32
    assert "cpu" in chosen.reason


def test_disabled_runs_fp32_even_where_fp16_is_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "fp16_unsupported_reason", lambda device: None)
    chosen = choose_precision(torch.device("cuda"), use_fp16=False)
    assert chosen == Precision(torch.float32, "FP16 disabled by USE_FP16")


def test_cuda_device_without_cuda_runs_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    chosen = choose_precision(torch.device("cuda"), use_fp16=True)
    assert chosen.dtype == torch.float32 and chosen.reason == "CUDA is not available"


def test_old_gpu_without_fp16_runs_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU cannot be had here: fake its presence and its compute capability.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (5, 2))
    chosen = choose_precision(torch.device("cuda"), use_fp16=True)
    assert chosen.dtype == torch.float32 and "(5, 2)" in chosen.reason


def test_supported_gpu_chooses_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose_precision(torch.device("cuda:0"), use_fp16=True).dtype == torch.float16


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_fp16_weights_use_half_the_memory_and_keep_shapes() -> None:
    module = _mlp()
    fp32_bytes = _param_bytes(module)
    shapes = [p.shape for p in module.parameters()]
    result = apply_precision(module, Precision(torch.float16, "test"), success_message="converted")
    assert result.dtype == torch.float16
    assert _param_bytes(module) * 2 == fp32_bytes
    assert [p.shape for p in module.parameters()] == shapes
    assert all(p.dtype == torch.float16 for p in module.parameters())


class _WindowAttention(torch.nn.Module):
    """Scores plus an additive mask the caller builds in FP32, as RMBG-2.0's Swin backbone does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + mask
        return scores.softmax(-1) @ v


class _SegmentationNet(torch.nn.Module):
    """Convolution, batch norm (buffers), window attention with an FP32 mask, a matte head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU()
        )
        self.attention = _WindowAttention(16)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        tokens = features.flatten(2).transpose(1, 2)
        mask = torch.zeros(tokens.shape[1], tokens.shape[1])  # FP32, whatever the model's dtype
        mask[:, : tokens.shape[1] // 2] = -100.0
        return self.head(self.attention(tokens, mask=mask)).sigmoid()


def _activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, set[torch.dtype]]:
    """Bytes of every submodule's output in one forward, and their dtypes."""
    outputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        for m in module.modules()
        if m is not module
    ]
    try:
        with torch.no_grad():
            outputs.append(module(x))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(o.numel() * o.element_size() for o in outputs), {o.dtype for o in outputs}


def _storage_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())


def test_fp16_policy_halves_a_models_weights_and_activations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the segmentors do on a GPU with FP16 (choose, convert, fix attention masks), run
    on the CPU: every weight, buffer and activation is half, and takes half the bytes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    torch.manual_seed(0)
    model = _SegmentationNet().eval()
    reference = copy.deepcopy(model)
    frames = torch.rand(2, 3, 8, 8)
    fp32_activations, fp32_dtypes = _activation_bytes(reference, frames)
    assert fp32_dtypes == {torch.float32}

    chosen = choose_precision(torch.device("cuda:0"), use_fp16=True)
    result = apply_precision(model, chosen, success_message="fp16", prepare=cast_attention_masks)

    assert result == chosen and result.dtype == torch.float16
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert {t.dtype for t in floating} == {torch.float16}
    assert _storage_bytes(model) * 2 == _storage_bytes(reference)
    fp16_activations, fp16_dtypes = _activation_bytes(model, frames.half())
    assert fp16_dtypes == {torch.float16}, "an activation was promoted back to FP32"
    assert fp16_activations * 2 == fp32_activations
    with torch.no_grad():
        expected = reference(frames)
        matte = model(frames.half())
    assert torch.allclose(matte.float(), expected, atol=5e-3)


def test_without_the_mask_fix_an_fp32_mask_breaks_the_fp16_model() -> None:
    """Why the segmentors pass ``cast_attention_masks``: without it the FP32 mask promotes the
    scores to FP32 and ``attn @ v`` meets FP16 values."""
    model = _SegmentationNet().eval()
    apply_precision(model, Precision(torch.float16, "t"), success_message="fp16")
    with pytest.raises(RuntimeError, match="dtype"), torch.no_grad():
        model(torch.rand(1, 3, 8, 8).half())


def test_success_message_is_logged_verbatim(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="segmentation.precision"):
        apply_precision(_mlp(), Precision(torch.float16, "t"), success_message="exact line")
    assert "exact line" in caplog.messages


def test_failed_prepare_falls_back_to_fp32(caplog: pytest.LogCaptureFixture) -> None:
    module = _mlp()

    def broken(_: torch.nn.Module) -> None:
        raise RuntimeError("kernel missing")

    with caplog.at_level(logging.WARNING, logger="segmentation.precision"):
        result = apply_precision(
            module, Precision(torch.float16, "t"), success_message="ok", prepare=broken
        )
    assert result.dtype == torch.float32
    assert "kernel missing" in result.reason
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert any("falling back to FP32" in m for m in caplog.messages)
    assert module(torch.randn(2, 64)).dtype == torch.float32


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0), (12, 1)])
def test_fp8_runs_from_compute_capability_8_9(capability: tuple[int, int]) -> None:
    assert precision.fp8_unsupported_reason("cuda", capability) is None


@pytest.mark.parametrize("capability", [(8, 6), (8, 0), (7, 5)])
def test_fp8_is_refused_below_8_9_naming_the_capability(capability: tuple[int, int]) -> None:
    reason = precision.fp8_unsupported_reason("cuda", capability)
    assert reason is not None
    assert f"{capability[0]}.{capability[1]}" in reason and "8.9" in reason


@pytest.mark.parametrize(("device_type", "capability"), [("cpu", None), ("cuda", None)])
def test_fp8_is_refused_without_a_cuda_capability(
    device_type: str, capability: tuple[int, int] | None
) -> None:
    reason = precision.fp8_unsupported_reason(device_type, capability)
    assert reason is not None and device_type in reason and "8.9" in reason


def test_a_lower_linear_format_shows_in_the_name_and_the_reason() -> None:
    base = Precision(torch.float16, "FP16 enabled on a CUDA GPU")
    assert base.name == "fp16" and base.linear is None
    int8 = base.with_linear("int8", "96 layers in INT8 (USE_INT8)")
    assert int8.name == "fp16+int8-linear" and int8.dtype == torch.float16
    assert int8.reason == "FP16 enabled on a CUDA GPU; 96 layers in INT8 (USE_INT8)"
    cpu = Precision(torch.float32, "device is cpu").with_linear("int8", "x")
    assert cpu.name == "fp32+int8-linear"
