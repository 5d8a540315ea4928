"""RMBG20Segmentor on the CPU with the tiny RMBG-2.0-format stand-in, through the real loader."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segmentation_standins as standins
from segmentation import precision
from segmentation.errors import ModelLoadError
from segmentation.models.rmbg20_loader import WEIGHTS_FILE, build_model, resolve_model_dir
from segmentation.models.rmbg20_segmentor import FP16_MESSAGE, RMBG20Segmentor
from tests.conftest import RMBG_ARCH_DIR, product_frame, published_rmbg

SIZE = 64  # the stand-in runs at any multiple of its window; small keeps CPU tests fast


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the device supports FP16: a CUDA GPU cannot be had on this machine."""
    monkeypatch.setattr(precision, "fp16_unsupported_reason", lambda device: None)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return standins.materialize(standins.RMBG_STANDIN)


def _segmentor(**kwargs: object) -> RMBG20Segmentor:
    return RMBG20Segmentor(standins.RMBG_STANDIN, device="cpu", input_size=SIZE, **kwargs)  # type: ignore[arg-type]


def test_mattes_have_each_frames_size_dtype_and_range() -> None:
    segmentor = _segmentor()
    frames = [product_frame(200, 120, 1), product_frame(37, 53, 2), product_frame(1, 1, 3)]
    mattes = segmentor.predict(frames)
    assert [m.shape for m in mattes] == [(120, 200), (53, 37), (1, 1)]
    assert all(m.dtype == np.uint8 for m in mattes)
    assert all(int(m.min()) >= 0 and int(m.max()) <= 255 for m in mattes)
    assert mattes[0].std() > 0  # a real matte, not a constant


def test_batched_prediction_equals_one_frame_at_a_time() -> None:
    segmentor = _segmentor()
    frames = [product_frame(160, 90, i) for i in range(3)]
    batched = segmentor.predict(frames)
    single = [segmentor.predict([f])[0] for f in frames]
    for a, b in zip(batched, single, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_not_converted_on_cpu() -> None:
    segmentor = _segmentor(use_fp16=True)
    assert segmentor.precision.dtype == torch.float32
    assert "cpu" in segmentor.precision.reason
    assert all(p.dtype == torch.float32 for p in segmentor.model.parameters())


def test_not_converted_when_disabled(fake_gpu: None) -> None:
    segmentor = _segmentor(use_fp16=False)
    assert segmentor.precision.dtype == torch.float32
    assert segmentor.info().precision == "fp32"
    assert all(p.dtype == torch.float32 for p in segmentor.model.parameters())


def test_converted_when_enabled_logs_the_line(
    fake_gpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        segmentor = _segmentor(use_fp16=True)
    assert FP16_MESSAGE in caplog.messages
    assert segmentor.info().precision == "fp16"
    assert all(p.dtype == torch.float16 for p in segmentor.model.parameters())


def test_input_tensors_converted_to_fp16(fake_gpu: None) -> None:
    segmentor = _segmentor(use_fp16=True)
    batch = segmentor.preprocess([product_frame(100, 80)])
    assert batch.dtype == torch.float16
    assert batch.shape == (1, 3, SIZE, SIZE)


def test_fp16_activations_are_fp16_inside_the_model(fake_gpu: None) -> None:
    segmentor = _segmentor(use_fp16=True)
    seen: dict[str, set[torch.dtype]] = {}

    def record(module: torch.nn.Module, args: tuple, output: object) -> None:
        tensors = output if isinstance(output, (list, tuple)) else [output]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                seen.setdefault(type(module).__name__, set()).add(t.dtype)

    for module in segmentor.model.modules():
        module.register_forward_hook(record)
    mattes = segmentor.predict([product_frame(100, 80)])
    assert seen["WindowAttention"] == {torch.float16}
    assert set().union(*seen.values()) == {torch.float16}
    assert mattes[0].shape == (80, 100)


def test_fp16_output_close_to_fp32(fake_gpu: None) -> None:
    frames = [product_frame(120, 90, 5)]
    fp32 = _segmentor(use_fp16=False).predict(frames)[0].astype(int)
    fp16 = _segmentor(use_fp16=True).predict(frames)[0].astype(int)
    assert np.abs(fp32 - fp16).max() <= 3


def test_stand_in_reproduces_the_fp32_mask_hazard(model_dir: Path) -> None:
    """Plain .half() fails on this code, as on the published one; the loader's hook fixes it."""
    model = build_model(model_dir).half()
    with pytest.raises(RuntimeError, match=r"dtype|scalar type"):
        model(torch.randn(1, 3, SIZE, SIZE, dtype=torch.float16))


def test_stand_in_reproduces_the_from_pretrained_hazard(model_dir: Path) -> None:
    """transformers 5 from_pretrained cannot build it; the project's loader can."""
    from transformers import AutoModelForImageSegmentation

    with pytest.raises(Exception):  # noqa: B017 - the exact error differs between 5.x releases
        AutoModelForImageSegmentation.from_pretrained(str(model_dir), trust_remote_code=True)
    assert build_model(model_dir) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_the_code_cannot_build_on_falls_back_to_the_cpu_build(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model(model_dir, device="cuda")  # no CUDA here: the GPU build fails
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert "building on the CPU" in caplog.text
    reference = build_model(model_dir)
    for got, want in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want)  # the weights were loaded, not left random


def test_conversion_failure_falls_back_to_fp32_and_keeps_serving(
    fake_gpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from segmentation.models import rmbg20_segmentor

    def broken(model: torch.nn.Module) -> int:
        raise RuntimeError("no FP16 kernel for deform_conv2d")

    monkeypatch.setattr(rmbg20_segmentor, "cast_attention_masks", broken)
    with caplog.at_level(logging.WARNING):
        segmentor = _segmentor(use_fp16=True)
    assert segmentor.precision.dtype == torch.float32
    assert "deform_conv2d" in segmentor.precision.reason
    assert all(p.dtype == torch.float32 for p in segmentor.model.parameters())
    assert segmentor.predict([product_frame(50, 40)])[0].shape == (40, 50)


def test_weights_are_loaded_not_random(model_dir: Path) -> None:
    from safetensors.torch import load_file

    segmentor = _segmentor()
    saved = load_file(str(model_dir / WEIGHTS_FILE))
    for name, tensor in segmentor.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def _copy_dir(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def test_missing_key_is_an_error(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    target = _copy_dir(model_dir, tmp_path)
    state = load_file(str(target / WEIGHTS_FILE))
    state.pop(sorted(state)[0])
    save_file(state, str(target / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"1 missing keys"):
        RMBG20Segmentor(str(target), device="cpu", trust_remote_code=True, input_size=SIZE)


def test_unexpected_key_is_an_error(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    target = _copy_dir(model_dir, tmp_path)
    state = load_file(str(target / WEIGHTS_FILE))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(target / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"1 unexpected keys"):
        RMBG20Segmentor(str(target), device="cpu", trust_remote_code=True, input_size=SIZE)


def test_a_tensor_of_another_shape_is_an_error(model_dir: Path, tmp_path: Path) -> None:
    """Even one that would broadcast into the model's tensor: weights are copied one by one."""
    from safetensors.torch import load_file, save_file

    target = _copy_dir(model_dir, tmp_path)
    state = load_file(str(target / WEIGHTS_FILE))
    name = next(k for k, v in sorted(state.items()) if v.ndim == 1 and v.numel() > 1)
    state[name] = state[name][:1].clone()  # shape (1,): broadcastable, but not the model's
    save_file(state, str(target / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=rf"1 tensors of another shape \(e.g. {name}: \[1\]"):
        RMBG20Segmentor(str(target), device="cpu", trust_remote_code=True, input_size=SIZE)


def test_local_directory_without_weights_says_what_to_do(model_dir: Path, tmp_path: Path) -> None:
    target = _copy_dir(model_dir, tmp_path)
    (target / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError) as info:
        RMBG20Segmentor(str(target), device="cpu", trust_remote_code=True)
    message = str(info.value)
    assert "model.safetensors" in message and "HF_TOKEN" in message and "RMBG_MODEL" in message


def test_dummy_load_format_needs_no_weights(model_dir: Path, tmp_path: Path) -> None:
    target = _copy_dir(model_dir, tmp_path)
    (target / WEIGHTS_FILE).unlink()
    segmentor = RMBG20Segmentor(
        str(target), device="cpu", trust_remote_code=True, load_format="dummy", input_size=SIZE
    )
    assert segmentor.predict([product_frame(30, 20)])[0].shape == (20, 30)


def test_random_weights_are_the_same_in_every_build_and_leave_the_generator_alone(
    model_dir: Path,
) -> None:
    """load_format=dummy: two processes (two replicas, a benchmark and its reference) run one
    model; the caller's random stream goes on as if nothing had been drawn."""
    torch.manual_seed(123)
    first = build_model(model_dir, load_weights=False).state_dict()
    after_first = torch.rand(4)
    torch.manual_seed(5)
    second = build_model(model_dir, load_weights=False).state_dict()
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after_first)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    weights = [t for t in first.values() if t.is_floating_point() and t.numel() > 1]
    assert any(float(t.std()) > 0 for t in weights)  # random, not constant


def test_remote_code_needs_explicit_trust(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"RMBG_TRUST_REMOTE_CODE=true"):
        RMBG20Segmentor(str(model_dir), device="cpu", trust_remote_code=False)


@pytest.mark.parametrize("revision", [None, "main", "v1.0"])
def test_hub_id_needs_a_pinned_commit(revision: str | None) -> None:
    with pytest.raises(ModelLoadError, match="RMBG_REVISION"):
        resolve_model_dir("briaai/RMBG-2.0", revision=revision, trust_remote_code=True)


def test_hub_id_unreachable_offline_says_how_to_get_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir("briaai/RMBG-2.0", revision="a" * 40, trust_remote_code=True)
    message = str(info.value)
    assert "not in the local cache" in message and "--local-dir" in message


def test_source_that_is_neither_dir_nor_hub_id() -> None:
    with pytest.raises(ModelLoadError, match=r"neither an existing directory"):
        resolve_model_dir("/no/such/dir", revision=None, trust_remote_code=True)


def test_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model_dir(str(tmp_path), revision=None, trust_remote_code=True)


def test_stand_in_is_reported_as_such() -> None:
    info = _segmentor().info()
    assert info.stand_in is True and info.source == standins.RMBG_STANDIN
    config = json.loads((standins.materialize(standins.RMBG_STANDIN) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageSegmentation"] == "birefnet.BiRefNet"


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_published_architecture_loads_and_runs_on_cpu() -> None:
    """The real birefnet.py (random weights) through the project's loader on transformers 5."""
    segmentor = published_rmbg(input_size=128)
    assert sum(p.numel() for p in segmentor.model.parameters()) > 200_000_000
    mattes = segmentor.predict([product_frame(96, 64)])
    assert mattes[0].shape == (64, 96) and mattes[0].dtype == np.uint8


def test_non_finite_fp16_output_is_recomputed_in_fp32(fake_gpu: None) -> None:
    """An FP16 overflow (injected: it cannot be provoked reliably with small weights) is
    answered with the FP32 result for that frame only, and counted."""
    frames = [product_frame(90, 60, seed=1), product_frame(90, 60, seed=2)]
    reference = _segmentor(use_fp16=False).predict(frames)
    segmentor = _segmentor(use_fp16=True)
    clean = segmentor.predict(frames)

    def overflow_second_frame(module: torch.nn.Module, args: tuple, output: object) -> object:
        assert isinstance(output, list)
        if output[-1].dtype == torch.float16:
            output[-1][1] = float("inf")
        return output

    handle = segmentor.model.register_forward_hook(overflow_second_frame)
    mattes = segmentor.predict(frames)
    handle.remove()
    assert segmentor.fp32_recomputed == 1
    assert (mattes[0] == clean[0]).all()  # the finite frame kept its FP16 result
    assert np.abs(mattes[1].astype(int) - reference[1].astype(int)).max() <= 1
    assert all(p.dtype == torch.float16 for p in segmentor.model.parameters())


def test_padding_to_a_bucket_changes_no_matte() -> None:
    segmentor = _segmentor()
    frames = [product_frame(64, 48, seed=s) for s in range(3)]
    plain = segmentor.predict(frames)
    segmentor.batch_buckets = (1, 4)
    timings: dict[str, float] = {}
    padded = segmentor.predict(frames, timings)
    for a, b in zip(plain, padded, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert set(timings) == {"preprocess", "forward", "postprocess", "copy"}


@pytest.fixture(scope="module")
def published() -> torch.nn.Module:
    """The published architecture with random weights (fixed seed), eager, FP32, on the CPU."""
    if not (RMBG_ARCH_DIR / "birefnet.py").exists():
        pytest.skip("published RMBG-2.0 code absent")
    torch.manual_seed(0)
    return build_model(RMBG_ARCH_DIR, load_weights=False)


@pytest.mark.parametrize(
    "steps",
    [
        ("sdpa",),
        ("sdpa", "windows"),
        ("decoder",),
        ("sdpa", "windows", "decoder"),
        ("resample",),
        ("decoder", "resample"),
        ("sdpa", "windows", "fuse"),
    ],
)
def test_each_fast_step_gives_the_published_models_outputs(
    published: torch.nn.Module, steps: tuple[str, ...]
) -> None:
    """At 128x128 every Swin stage pads (32 -> 36 ... 4 -> 12) and shifts, and the decoder
    cuts 4x4 to 32x32 patches: the geometry of 1024x1024, smaller."""
    import copy

    from segmentation.models import rmbg20_fast

    torch.manual_seed(1)
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        reference = published(x)
        fast = copy.deepcopy(published)
        assert rmbg20_fast.optimize(fast, steps) == steps
        outputs = fast(x)
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    for out, ref in zip(outputs, reference, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert reference[-1].std() > 1e-3  # a map that a wrong token order would change


@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 6, 16, 16), (32, 32)), ((2, 6, 32, 24), (4, 4)), ((1, 1, 8, 8), (8, 8))],
)
def test_resize_gives_the_plain_calls_result_in_the_plain_layout(
    shape: tuple[int, ...], size: tuple[int, int]
) -> None:
    from segmentation.models.rmbg20_fast import resize

    x = torch.randn(shape)
    out = resize(x, size)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    assert out.is_contiguous() and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["", "add", "cat"])
@pytest.mark.parametrize("context", [[], ["sum"], ["sum", "cat"], ["sum", "cat", "x"]])
def test_the_resample_encoder_is_the_published_one_for_each_configuration(
    published: torch.nn.Module, mode: str, context: list[str]
) -> None:
    """The ``resample`` step's ``forward_enc`` against the published one on the same weights,
    for each two-scale mode and number of context features the model's config can name
    (the published config: ``cat`` and three)."""
    from segmentation.models import rmbg20_fast

    config = published.config
    saved = config.mul_scl_ipt, config.cxt
    config.mul_scl_ipt, config.cxt = mode, context
    try:
        torch.manual_seed(2)
        x = torch.randn(2, 3, 96, 128)  # not square: heights and widths kept apart
        with torch.inference_mode():
            (expected, _), (features, classes) = (
                type(published).forward_enc(published, x),
                rmbg20_fast._encoder(published, x),
            )
    finally:
        config.mul_scl_ipt, config.cxt = saved
    assert classes is None
    assert [f.shape for f in features] == [e.shape for e in expected]
    for out, ref in zip(features, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_compiled_decoder_gives_the_published_models_outputs(published: torch.nn.Module) -> None:
    """The ``compile-decoder`` step: one Inductor graph of the whole decoder (its deformable
    convolutions' sampling included) for a batch of two; told to compile for two only, a
    batch of three runs it eagerly, as a single frame does. With ``resample`` the compiled
    body reads its resize function from the module and still makes one graph."""
    import copy

    import torch._dynamo.utils

    from segmentation.models import rmbg20_fast

    torch.manual_seed(1)
    x = torch.randn(3, 3, 128, 128)
    steps = ("decoder", "deform", "resample", "compile-decoder")
    graphs = torch._dynamo.utils.counters["stats"]
    with torch.inference_mode():
        reference = published(x)
        fast = copy.deepcopy(published)
        assert rmbg20_fast.optimize(fast, steps) == steps
        before = graphs["unique_graphs"]
        pair = fast(x[:2])
        compiled = graphs["unique_graphs"] - before
        rmbg20_fast.compile_decoder_for(fast, [2])
        triple = fast(x)
        single = fast(x[:1])
        assert graphs["unique_graphs"] - before == compiled == 1  # none for 3, none for 1
    assert [o.shape for o in triple] == [r.shape for r in reference]
    for out, ref in zip(triple, reference, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair[-1], reference[-1][:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single[-1], reference[-1][:1], atol=1e-5, rtol=1e-4)


def test_the_compiled_decoder_without_its_artifact_is_left_out_and_reported(
    tmp_path: Path,
) -> None:
    from segmentation.models import rmbg20_fast

    if not (RMBG_ARCH_DIR / "birefnet.py").exists():
        pytest.skip("published RMBG-2.0 code absent")
    steps = (*rmbg20_fast.DEFAULT_STEPS, rmbg20_fast.COMPILE_DECODER)
    segmentor = published_rmbg(input_size=128, optimized=steps, compile_cache=tmp_path)
    info = segmentor.info()
    assert info.inference_path == "sdpa+windows+decoder+deform+resample+fuse"
    assert info.compile is not None
    assert info.compile["state"].startswith("not compiled: no artifact for this model")
    assert "decoder" not in info.compile  # nothing compiled
    at_start = published_rmbg(input_size=128, optimized=steps).info()
    assert at_start.inference_path == "sdpa+windows+decoder+deform+resample+fuse+compile-decoder"
    assert at_start.compile == {
        "state": "compiled at start-up (no RMBG_COMPILE_CACHE)",
        "decoder": "compiled for each batch size from 2 (no batch sizes set)",
    }


def test_published_architecture_reports_its_fast_path() -> None:
    """On the CPU the ``attn`` kernel cannot run, so the path does not name it (``fuse`` runs
    its PyTorch versions here: the same arithmetic, named)."""
    if not (RMBG_ARCH_DIR / "birefnet.py").exists():
        pytest.skip("published RMBG-2.0 code absent")
    fast = published_rmbg(input_size=128)
    assert fast.info().inference_path == "sdpa+windows+decoder+deform+resample+fuse"
    assert fast.info().as_dict()["inference_path"] == "sdpa+windows+decoder+deform+resample+fuse"
    eager = published_rmbg(input_size=128, optimized=False)
    assert eager.info().inference_path == "eager" and eager.fast_steps == ()


def test_stand_in_has_no_published_modules_and_runs_eager() -> None:
    segmentor = _segmentor()
    assert segmentor.fast_steps == () and segmentor.info().inference_path == "eager"


def test_unknown_fast_step_is_refused() -> None:
    from segmentation.models import rmbg20_fast

    with pytest.raises(ValueError, match="unknown optimization steps"):
        rmbg20_fast.optimize(torch.nn.Linear(2, 2), ("turbo",))


def test_concurrent_predicts_stay_right_while_one_recomputes_in_fp32(fake_gpu: None) -> None:
    """One thread's FP16 output overflows (injected) and is recomputed in FP32 while its
    weights are swapped; a second thread predicting all the while must neither see FP32
    weights (a dtype error) nor get anything but its own FP16 result."""
    import threading
    import time

    frames_a = [product_frame(90, 60, seed=1), product_frame(90, 60, seed=2)]
    frames_b = [product_frame(80, 50, seed=3)]
    reference_a = _segmentor(use_fp16=False).predict(frames_a)
    segmentor = _segmentor(use_fp16=True)
    clean_b = segmentor.predict(frames_b)[0]

    def overflow_in_thread_a(module: torch.nn.Module, args: tuple, output: object) -> object:
        assert isinstance(output, list)
        if threading.current_thread().name == "a":
            if output[-1].dtype == torch.float16:
                output[-1][1] = float("inf")
            else:
                time.sleep(0.3)  # hold the FP32 weights long enough for "b" to run into them
        return output

    handle = segmentor.model.register_forward_hook(overflow_in_thread_a)
    results: dict[str, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    done = threading.Event()
    b_ran = threading.Event()  # "a" starts once "b" is looping, however busy the machine

    def run_a() -> None:
        b_ran.wait(60)
        try:
            results["a"] = segmentor.predict(frames_a)
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)
        finally:
            done.set()

    def run_b() -> None:
        try:
            while not done.is_set():
                results.setdefault("b", []).append(segmentor.predict(frames_b)[0])
                b_ran.set()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_b, name="b"), threading.Thread(target=run_a, name="a")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    handle.remove()
    assert not errors
    assert segmentor.fp32_recomputed == 1
    assert np.abs(results["a"][1].astype(int) - reference_a[1].astype(int)).max() <= 1
    assert len(results["b"]) >= 2
    assert all((matte == clean_b).all() for matte in results["b"])
    assert all(p.dtype == torch.float16 for p in segmentor.model.parameters())


def test_the_model_input_has_one_layout_whatever_the_frames_sizes() -> None:
    """A frame already at the input size skips the resize's copy and would keep its
    channels-last layout: a compiled graph (which specialises on strides) would then be
    traced again, mid-request, for such a batch."""
    segmentor = _segmentor()
    square = segmentor.preprocess([product_frame(SIZE, SIZE, 1)] * 2)
    other = segmentor.preprocess([product_frame(SIZE + 40, SIZE - 8, 2)] * 2)
    assert square.shape == other.shape == (2, 3, SIZE, SIZE)
    assert square.stride() == other.stride() == (3 * SIZE * SIZE, SIZE * SIZE, SIZE, 1)
