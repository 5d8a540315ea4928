"""benchmarks.rmbg_profile: kernels sorted by category, a forward's stages found by its hooks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.profiler_util import Kernel
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.rmbg_profile import STAGE, category, stage_ranges, summarise


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        # names as CUDA profiles of the model print them
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x64",
            "attention",
        ),
        (
            "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128",
            "convolution",
        ),
        ("triton_poi_fused__to_copy_add_convolution_mul_sigmoid_12", "triton (compiled)"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matrix product"),
        (
            "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1",
            "matrix product",
        ),
        (
            "void at::native::(anonymous namespace)::"
            "vectorized_layer_norm_kernel<c10::Half, float>",
            "normalisation",
        ),
        (
            "void at::native::(anonymous namespace)::"
            "upsample_bilinear2d_out_frame<c10::Half, float>",
            "resampling",
        ),
        (
            "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel>",
            "gather / scatter",
        ),
        (
            "void at::native::(anonymous namespace)::"
            "CatArrayBatchedCopy<at::native::OpaqueType<2u>>",
            "copy / cat",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, "
            "at::native::CUDAFunctor_add<c10::Half>>",
            "elementwise",
        ),
        ("Memset (Device)", "other"),
    ],
)
def test_kernels_fall_into_their_category(kernel: str, expected: str) -> None:
    assert category(kernel) == expected


class _Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, 8, 2, stride=2)
        self.layers = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x


class _TwoScaleModel(torch.nn.Module):
    """The published model's shape: a backbone run at two sizes, a squeeze block, a decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.bb = _Backbone()
        self.squeeze_module = torch.nn.Conv2d(16, 16, 1)
        self.decoder = torch.nn.Conv2d(16, 1, 1)
        self.fail_in_decoder = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.bb(x)
        half = self.bb(F.interpolate(x, scale_factor=0.5, mode="bilinear"))
        features = torch.cat([full, F.interpolate(half, size=full.shape[2:])], 1)
        if self.fail_in_decoder:
            self.decoder.weight.data = self.decoder.weight.data[:, :3]  # a channel mismatch
        return self.decoder(self.squeeze_module(features))


def test_each_stage_of_a_forward_is_found_once_per_call_and_the_hooks_go() -> None:
    model = _TwoScaleModel()
    x = torch.randn(2, 3, 32, 32)
    with (
        torch.inference_mode(),
        stage_ranges(model),
        profile(activities=[ProfilerActivity.CPU]) as prof,
        record_function(STAGE + "forward"),
    ):
        model(x)
    result = summarise(prof.events(), frames=2)
    stages = result["stages"]
    parts = ["patch embedding", "Swin stage 1", "Swin stage 2"]
    expected = {"forward", "squeeze", "decoder", "outside the parts above"}
    for size in ("32px", "16px"):  # the backbone's two passes, told apart by their input
        expected |= {f"backbone {size}", *(f"backbone {size} / {p}" for p in parts)}
    assert set(stages) == expected
    assert all(stage["calls"] == 1 for stage in stages.values())
    assert all(stages[name]["cpu_ms"] > 0 for name in expected - {"outside the parts above"})
    # the parts are inside the forward: what is left of it is its resampling and cat
    top = sum(stages[n]["cpu_ms"] for n in ("backbone 32px", "backbone 16px", "squeeze", "decoder"))
    assert 0 < stages["outside the parts above"]["cpu_ms"] < stages["forward"]["cpu_ms"]
    assert top < stages["forward"]["cpu_ms"]
    assert result["device_ms_per_frame"] == 0  # no kernel on a CPU
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_forward_that_raises_inside_a_stage_leaves_no_hook_or_open_range() -> None:
    model = _TwoScaleModel()
    model.fail_in_decoder = True
    with pytest.raises(RuntimeError), stage_ranges(model):
        model(torch.randn(1, 3, 32, 32))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(STAGE + "forward"):
        torch.ones(1) + 1
    assert set(summarise(prof.events(), frames=1)["stages"]) == {
        "forward",
        "outside the parts above",
    }


def _op(
    op_id: int, name: str, kernels: list[tuple[str, float]], children: list[Any] | None = None
) -> SimpleNamespace:
    """A CPU event as the profiler reports it: its kernels as (name, device, microseconds)."""
    return SimpleNamespace(
        id=op_id,
        name=name,
        device_type=torch.autograd.DeviceType.CPU,
        cpu_time_total=10.0,
        kernels=[Kernel(k, 0, us) for k, us in kernels],
        cpu_children=children or [],
    )


def _kernel(name: str, us: float) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, device_type=torch.autograd.DeviceType.CUDA, device_time_total=us
    )


def test_each_kernel_counts_once_in_each_stage_that_holds_it() -> None:
    """The cases a GPU profile has: nested ops that share a correlation id carry the same
    kernels; a CUDA runtime call (no kernels) can have an op's id; the profiler copies each
    range to the GPU timeline as an event of its own."""
    gemm, norm, up = "nvjet_sm90_hsh_192x192", "vectorized_layer_norm_kernel", "upsample_bilinear2d"
    linear = _op(7, "aten::linear", [(gemm, 400.0)], [_op(7, "aten::addmm", [(gemm, 400.0)])])
    stage = _op(
        5, STAGE + "backbone 32px / Swin stage 1", [], [_op(7, "cudaLaunchKernel", []), linear]
    )
    backbone = _op(
        3, STAGE + "backbone 32px", [], [stage, _op(8, "aten::layer_norm", [(norm, 100.0)])]
    )
    decoder = _op(9, STAGE + "decoder", [], [_op(10, "aten::upsample_bilinear2d", [(up, 50.0)])])
    forward = _op(
        1,
        STAGE + "forward",
        [],
        [backbone, decoder, _op(11, "aten::cat", [("CatArrayBatchedCopy", 30.0)])],
    )
    events = [forward, backbone, stage, decoder, *stage.cpu_children, linear, *linear.cpu_children]
    events += [_kernel(gemm, 400.0), _kernel(norm, 100.0), _kernel(up, 50.0)]
    events += [_kernel("CatArrayBatchedCopy", 30.0), _kernel(STAGE + "forward", 999.0)]
    result = summarise(events, frames=2)
    stages = result["stages"]
    assert result["device_ms_per_frame"] == 0.29  # 580 us of kernels over 2 frames
    assert result["attributed_ms_per_frame"] == stages["forward"]["device_ms"] == 0.29
    assert stages["backbone 32px / Swin stage 1"]["device_ms"] == 0.2  # the gemm once
    assert stages["backbone 32px"]["device_ms"] == 0.25
    assert stages["backbone 32px"]["categories"] == {"matrix product": 0.2, "normalisation": 0.05}
    assert stages["decoder"]["categories"] == {"resampling": 0.025}
    assert stages["outside the parts above"]["device_ms"] == pytest.approx(0.015)
    assert all(k["name"] != STAGE + "forward" for k in result["kernels"])
