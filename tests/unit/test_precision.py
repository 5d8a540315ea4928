import logging

import pytest
import torch

from segmentation import precision
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


def test_fp16_tensor_is_half_of_fp32() -> None:
    tensor = torch.randn(3, 1024, 1024)
    half = tensor.half()
    assert half.element_size() * half.nelement() * 2 == tensor.element_size() * tensor.nelement()
    assert half.shape == tensor.shape


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
