"""Pure FP16 on the real architectures: dtypes inside the model, memory halved, outputs close.

RMBG-2.0 is the published birefnet.py with random weights (RMBG_ARCH_DIR); YOLO11-seg comes
from Ultralytics' own yaml. Measured figures are printed (run with -s) for the notes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmentation.models.rmbg20_loader import WEIGHTS_FILE
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from tests.conftest import RMBG_ARCH_DIR, product_frame

needs_arch = pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)


@pytest.fixture(scope="module")
def rmbg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published architecture with one set of random weights saved as model.safetensors,
    so FP32 and FP16 load the same weights through the real loader."""
    from safetensors.torch import save_file

    target = tmp_path_factory.mktemp("rmbg") / "RMBG-2.0"
    shutil.copytree(RMBG_ARCH_DIR, target)
    torch.manual_seed(0)
    model = RMBG20Segmentor(str(target), device="cpu", trust_remote_code=True, load_format="dummy")
    save_file(
        {k: v.contiguous() for k, v in model.model.state_dict().items()}, str(target / WEIGHTS_FILE)
    )
    return target


def _load(path: Path, fp16: bool, optimized: bool = True) -> RMBG20Segmentor:
    return RMBG20Segmentor(
        str(path), device="cuda", use_fp16=fp16, trust_remote_code=True, optimized=optimized
    )


def _peak(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


@needs_arch
def test_rmbg_activations_are_fp16_inside_the_model(rmbg_dir: Path) -> None:
    segmentor = _load(rmbg_dir, fp16=True)
    assert segmentor.precision.name == "fp16"
    assert segmentor.info().inference_path == "sdpa+windows+decoder+deform+resample+fuse+attn"
    dtypes: dict[str, set[torch.dtype]] = {}

    def record(module: torch.nn.Module, args: tuple, output: object) -> None:
        outs = output if isinstance(output, (list, tuple)) else [output]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                dtypes.setdefault(type(module).__name__, set()).add(t.dtype)

    handles = [m.register_forward_hook(record) for m in segmentor.model.modules()]
    segmentor.predict([product_frame(1920, 1080)])
    for handle in handles:
        handle.remove()
    not_fp16 = {name: d for name, d in dtypes.items() if d != {torch.float16}}
    print(f"\nmodule types seen: {len(dtypes)}, not pure FP16: {not_fp16}")
    assert "WindowAttention" in dtypes
    assert not not_fp16
    assert all(p.dtype == torch.float16 for p in segmentor.model.parameters())


@needs_arch
def test_rmbg_fp16_peak_memory_at_most_55_percent_of_fp32(rmbg_dir: Path) -> None:
    frames = [product_frame(1920, 1080, seed=i) for i in range(4)]
    peaks = {}
    for fp16 in (False, True):  # the eager FP32 reference against the fast FP16 path
        segmentor = _load(rmbg_dir, fp16, optimized=fp16)
        segmentor.predict(frames[:1])
        weights = torch.cuda.memory_allocated()
        peak = _peak(lambda s=segmentor: s.predict(frames))
        peaks[fp16] = weights + peak
        print(
            f"\nfp16={fp16}: weights {weights / 2**30:.2f} GiB, batch 4 activations "
            f"{peak / 2**30:.2f} GiB, total peak {(weights + peak) / 2**30:.2f} GiB"
        )
        del segmentor
        torch.cuda.empty_cache()
    ratio = peaks[True] / peaks[False]
    print(f"FP16/FP32 peak ratio at batch 4: {ratio:.3f}")
    assert ratio <= 0.55


@needs_arch
def test_rmbg_fp16_output_close_to_fp32(rmbg_dir: Path) -> None:
    frames = [product_frame(1280, 720, seed=i) for i in range(2)]
    outputs = {}
    for fp16 in (False, True):  # the eager FP32 reference against the fast FP16 path
        segmentor = _load(rmbg_dir, fp16, optimized=fp16)
        with torch.inference_mode():
            batch = segmentor.preprocess(frames)
            outputs[fp16] = segmentor.forward(batch).float().sigmoid().cpu()
        del segmentor
        torch.cuda.empty_cache()
    diff = (outputs[True] - outputs[False]).abs()
    print(f"\nFP16 vs FP32 sigmoid: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    assert float(diff.max()) <= 2 / 255
    assert float(diff.mean()) < 1e-3


@needs_arch
@pytest.mark.parametrize(
    "steps",
    [
        ("sdpa",),
        ("sdpa", "windows"),
        ("decoder",),
        ("deform",),
        ("resample",),
        ("sdpa", "windows", "decoder", "deform", "resample"),
        ("sdpa", "windows", "fuse"),
        ("sdpa", "attn"),
        ("sdpa", "windows", "decoder", "deform", "resample", "fuse", "attn"),
        ("sdpa", "windows", "decoder", "deform", "compile"),
    ],
    ids="+".join,
)
def test_rmbg_each_fast_step_in_fp16_stays_within_2_of_255_of_eager_fp32(
    rmbg_dir: Path, steps: tuple[str, ...]
) -> None:
    frames = [product_frame(1024, 1024, seed=7 + i) for i in range(2)]
    probs = {}
    for name, fp16, optimized in (("fp32", False, False), ("fast", True, steps)):
        segmentor = RMBG20Segmentor(
            str(rmbg_dir),
            device="cuda",
            use_fp16=fp16,
            trust_remote_code=True,
            optimized=optimized,
        )
        assert segmentor.fast_steps == (steps if fp16 else ())
        with torch.inference_mode():
            logits = segmentor.forward(segmentor.preprocess(frames))
            assert logits.dtype == (torch.float16 if fp16 else torch.float32)
            probs[name] = logits.float().sigmoid().cpu()
        del segmentor
        torch.cuda.empty_cache()
    diff = (probs["fast"] - probs["fp32"]).abs()
    print(f"\n{'+'.join(steps)} FP16 vs eager FP32: max {diff.max() * 255:.2f}/255")
    assert float(diff.max()) <= 2 / 255


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((16, 192, 128, 128), (256, 256)),  # the half-size pass's first stage, brought up
        ((16, 384, 256, 256), (32, 32)),  # the context features, brought down
        ((16, 384, 128, 128), (256, 256)),  # the decoder's last 2x step
    ],
)
def test_resize_through_the_channels_last_kernel_matches_the_plain_call(
    shape: tuple[int, ...], size: tuple[int, int]
) -> None:
    from segmentation.models.rmbg20_fast import resize

    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    out = resize(x, size)
    assert out.is_contiguous() and out.dtype == torch.float16
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("side", "channels", "heads", "shifted"),
    [(256, 192, 6, True), (64, 768, 24, False), (64, 768, 24, True), (16, 1536, 48, True)],
)
def test_swin_kernels_on_the_models_shapes_match_the_pytorch_versions(
    side: int, channels: int, heads: int, shifted: bool
) -> None:
    """The Triton kernels of the ``fuse`` and ``attn`` steps on real geometries at batch 16
    (the first stage at 1024, the third, the last at 512: padded 256 -> 264, 64 -> 72, 16 ->
    24) against their PyTorch versions in FP32."""
    from benchmarks.window_attention import WINDOW
    from segmentation.models import rmbg20_kernels as kernels
    from segmentation.models.rmbg20_fast import _shift_mask

    batch, tokens, device = 16, WINDOW * WINDOW, torch.device("cuda")
    padded = -(-side // WINDOW) * WINDOW
    windows = (padded // WINDOW) ** 2
    gen = torch.Generator(device=device).manual_seed(3)
    qkv = torch.randn(batch * windows, tokens, 3 * channels, device=device, generator=gen).half()
    bias = torch.randn(1, heads, tokens, tokens, device=device, generator=gen)
    if shifted:
        mask = _shift_mask(padded, padded, WINDOW, WINDOW // 2, device)
        bias = (bias + mask.unsqueeze(1)).reshape(1, -1, tokens, tokens)
    bias = bias.half()
    scale = (channels // heads) ** -0.5
    assert kernels.takes_attention(qkv, heads)
    out = kernels.window_attention(qkv, bias, heads, scale)
    expected = kernels.window_attention_reference(qkv.float(), bias.float(), heads, scale)
    assert out.dtype == torch.float16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=4e-3, rtol=1e-2)

    shift = WINDOW // 2 if shifted else 0
    rows = (torch.arange(padded, device=device) + shift) % padded
    grid = (rows[:, None] * padded + rows[None, :]).view(
        padded // WINDOW, WINDOW, padded // WINDOW, WINDOW
    )
    to_windows = grid.permute(0, 2, 1, 3).reshape(-1)
    inverse = torch.empty_like(to_windows)
    inverse[to_windows] = torch.arange(padded * padded, device=device)
    from_windows = inverse.view(padded, padded)[:side, :side].reshape(-1)
    r, c = to_windows // padded, to_windows % padded
    sources = torch.where((r < side) & (c < side), r * side + c, -1)
    x = torch.randn(batch, side * side, channels, device=device, generator=gen).half()
    w, b, out_bias = (torch.randn(channels, device=device, generator=gen).half() for _ in range(3))
    got = kernels.ln_windows(x, w, b, 1e-5, sources)
    want = kernels.ln_windows_reference(x.float(), w.float(), b.float(), 1e-5, sources)
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)
    assert bool((got.view(batch, -1, channels)[:, sources < 0] == 0).all())
    attended = torch.randn(batch * windows, tokens, channels, device=device, generator=gen).half()
    got_pair = kernels.unwindow_residual_ln(x, attended, from_windows, w, b, 1e-5, out_bias)
    want_pair = kernels.unwindow_residual_ln_reference(
        x.float(), attended.float(), from_windows, w.float(), b.float(), 1e-5, out_bias.float()
    )
    for g, e in zip(got_pair, want_pair, strict=True):
        torch.testing.assert_close(g.float(), e, atol=2e-2, rtol=1e-2)


@needs_arch
def test_rmbg_compiled_blocks_serve_every_batch_size_and_an_fp32_recompute_compiles_nothing(
    rmbg_dir: Path,
) -> None:
    """The compiled Swin blocks take the batch size as a symbol: after batch 4 and 2 compiled
    them, batch 3 adds no graph; an FP32 recompute (the overflow path) runs the eager body."""
    from torch._dynamo.utils import counters

    from segmentation.models.rmbg20_segmentor import _in_fp32

    segmentor = RMBG20Segmentor(
        str(rmbg_dir),
        device="cuda",
        trust_remote_code=True,
        optimized=("sdpa", "windows", "decoder", "deform", "compile"),
    )
    frames = [product_frame(640, 480, seed=20 + i) for i in range(4)]
    with torch.inference_mode():
        batch = segmentor.preprocess(frames)
        for size in (4, 2):
            segmentor.forward(batch[:size])
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > 0
        fp16 = segmentor.forward(batch[:3]).float().sigmoid()
        assert counters["stats"]["unique_graphs"] == compiled  # batch 3: no new graph
        with _in_fp32(segmentor.model):
            fp32 = segmentor.forward(batch[:3].float()).sigmoid()
    assert counters["stats"]["unique_graphs"] == compiled  # FP32: eager, nothing compiled
    assert float((fp16 - fp32).abs().max()) <= 2 / 255


@pytest.mark.parametrize("name", ["yolo11n-seg.yaml", "yolo11x-seg.yaml"])
def test_yolo_fp16_in_use_and_memory_halved(name: str) -> None:
    frames = [product_frame(1920, 1080, seed=i) for i in range(32)]
    peaks = {}
    for fp16 in (False, True):
        model = YoloSegmentor(name, device="cuda", use_fp16=fp16)
        assert model.precision.name == ("fp16" if fp16 else "fp32")
        batch, _ = model.preprocess(frames[:1])
        with torch.inference_mode():
            preds, protos = model.forward(batch)
        expected = torch.float16 if fp16 else torch.float32
        assert batch.dtype == preds.dtype == protos.dtype == expected
        with torch.inference_mode():
            full, _ = model.preprocess(frames)
            peaks[fp16] = _peak(lambda m=model, b=full: m.forward(b))
        del model
        torch.cuda.empty_cache()
    ratio = peaks[True] / peaks[False]
    print(
        f"\n{name} batch 32 forward activations: FP32 {peaks[False] / 2**30:.2f} GiB, "
        f"FP16 {peaks[True] / 2**30:.2f} GiB, ratio {ratio:.3f}"
    )
    assert ratio <= 0.6


def test_yolo_fp16_detections_match_fp32() -> None:
    torch.manual_seed(0)
    fp32 = YoloSegmentor("yolo11n-seg.yaml", device="cuda", use_fp16=False)
    fp16 = YoloSegmentor("yolo11n-seg.yaml", device="cuda", use_fp16=True)
    fp16.model.load_state_dict(
        {k: v.half() if v.is_floating_point() else v for k, v in fp32.model.state_dict().items()}
    )
    frame = product_frame(1280, 720)
    with torch.inference_mode():
        a, _ = fp32.forward(fp32.preprocess([frame])[0])
        b, _ = fp16.forward(fp16.preprocess([frame])[0])
    rel = ((a - b.float()).abs().max() / a.abs().max()).item()
    print(f"\nYOLO11n-seg raw output FP16 vs FP32: max relative diff {rel:.2e}")
    assert rel < 1e-2
    assert np.isfinite(b.float().cpu().numpy()).all()
