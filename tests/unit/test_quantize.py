"""FP8 and INT8 transformer linear layers (USE_FP8, USE_INT8) on the CPU: INT8 for real on the
trained stand-in, FP8's refusal for real, and what happens without torchao."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import segmentation_standins as standins
from segmentation import quantize
from segmentation.config import load_settings
from segmentation.errors import ModelLoadError
from segmentation.factory import build_segmentor
from segmentation.models import rmbg20_segmentor
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor, _in_fp32
from segmentation.quantize import (
    check_supported,
    quantizable_linears,
    quantize_linears,
    transformer_linears,
)
from segmentation_standins import synthetic
from segmentation_standins.quality import matte_iou
from tests.conftest import RMBG_ARCH_DIR

torchao_quantization = pytest.importorskip("torchao.quantization")

#: INT8 weights are held to what FP16 may cost against FP32 on the same stand-in
#: (tests/gpu/test_quality_gpu.py): at most 4/255 anywhere and 0.05/255 on average; and no
#: more than 0.1% of the pixels more than 2/255 off. Weight-only INT8 rounds each weight by
#: at most half a step, 1/254 of its row's largest weight, in 8 of the stand-in's layers.
INT8_MAX_DIFF = 4
INT8_MEAN_DIFF = 0.05
INT8_OVER_2 = 0.001
STANDIN_SIZE = 256  # the stand-in's training size


@pytest.fixture(scope="module")
def scenes() -> list[synthetic.Scene]:
    return [synthetic.scene(3100 + i, 0, 320, 240) for i in range(4)]


@pytest.fixture(scope="module")
def fp32() -> RMBG20Segmentor:
    return RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=STANDIN_SIZE)


@pytest.fixture(scope="module")
def int8() -> RMBG20Segmentor:
    return RMBG20Segmentor(
        standins.PRODUCT_RMBG, device="cpu", input_size=STANDIN_SIZE, linear_format="int8"
    )


def test_the_quantized_layers_are_each_blocks_attention_and_mlp_linears(
    fp32: RMBG20Segmentor,
) -> None:
    names = transformer_linears(fp32.model)
    blocks = [name for name, m in fp32.model.named_modules() if type(m).__name__ == "Block"]
    assert blocks
    expected = [
        f"{block}.{layer}"
        for block in blocks
        for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    ]
    assert names == expected


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_in_the_published_model_they_are_the_swin_blocks_qkv_proj_fc1_fc2_only() -> None:
    from segmentation.models.rmbg20_loader import build_model

    model = build_model(RMBG_ARCH_DIR, load_weights=False, device=torch.device("cpu"))
    names = transformer_linears(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert blocks and len(names) == 4 * len(blocks)
    assert {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in names} == {
        "attn.qkv",
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
    }
    others = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(names)
    assert others and all(name.endswith("downsample.reduction") for name in others)


def test_int8_quantizes_those_layers_and_says_so(int8: RMBG20Segmentor) -> None:
    names = set(transformer_linears(int8.model))
    for name, module in int8.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert isinstance(module.weight, torchao_quantization.Int8Tensor) == (name in names)
            if name in names:
                assert module.weight.qdata.dtype == torch.int8
            assert isinstance(module, quantize.DequantizingLinear) == (name in names)
    plain = [p for p in int8.model.parameters() if type(p) is torch.nn.Parameter]
    assert plain and {p.dtype for p in plain} == {torch.float32}  # the rest as on a CPU
    assert int8.precision.name == int8.info().precision == "fp32+int8-linear"
    assert int8.precision.linear == "int8"
    assert "USE_INT8" in int8.info().precision_reason
    assert "cpu" in int8.info().precision_reason


def test_int8_stand_in_gives_uint8_mattes_at_each_frames_size(
    int8: RMBG20Segmentor, scenes: list[synthetic.Scene]
) -> None:
    frames = [scenes[0].image, scenes[1].image[:200, :300].copy()]
    mattes = int8.predict(frames)
    assert [m.shape for m in mattes] == [(240, 320), (200, 300)]
    assert all(m.dtype == np.uint8 for m in mattes)
    with torch.inference_mode():
        logits = int8.forward(int8.preprocess(frames[:1]))
    assert logits.dtype == torch.float32
    assert logits.shape == (1, 1, STANDIN_SIZE, STANDIN_SIZE)


def test_int8_mattes_stay_within_the_fp16_bound_of_fp32_on_the_trained_stand_in(
    fp32: RMBG20Segmentor, int8: RMBG20Segmentor, scenes: list[synthetic.Scene]
) -> None:
    frames = [scene.image for scene in scenes]
    reference, quantized = fp32.predict(frames), int8.predict(frames)
    diff = np.concatenate(
        [
            np.abs(a.astype(int) - b.astype(int)).ravel()
            for a, b in zip(reference, quantized, strict=True)
        ]
    )
    print(f"\nINT8 vs FP32: max {diff.max()}/255, mean {diff.mean():.2e}/255")
    assert diff.max() <= INT8_MAX_DIFF
    assert diff.mean() <= INT8_MEAN_DIFF
    assert (diff > 2).mean() <= INT8_OVER_2
    for matte, scene in zip(quantized, scenes, strict=True):
        assert matte_iou(matte, scene) >= 0.9  # still finds the products


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_int8_layer_gives_torchaos_own_weight_only_product(dtype: torch.dtype) -> None:
    """The layer casts its INT8 weight back and runs the plain product: torchao's weight-only
    product (output scaled after the product) up to the activations' rounding."""
    torch.manual_seed(0)
    model = _Block(48).to(dtype)
    reference = _Block(48).to(dtype)
    reference.load_state_dict(model.state_dict())
    quantize_linears(model, "int8", torch.device("cpu"))
    torchao_quantization.quantize_(
        reference, torchao_quantization.Int8WeightOnlyConfig(set_inductor_config=False)
    )
    assert isinstance(model.attn.qkv, quantize.DequantizingLinear)
    assert isinstance(model.attn.qkv.weight, torchao_quantization.Int8Tensor)
    assert not isinstance(reference.attn.qkv, quantize.DequantizingLinear)
    x = torch.randn(4, 10, 48, dtype=dtype)
    with torch.inference_mode():
        got, expected = model(x), reference(x)
    assert got.dtype == dtype and got.shape == (4, 10, 48)
    # FP16: the products round differently (scaled before or after), by about a unit in
    # the last place of outputs near 1
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    )
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(
        model.attn.qkv.weight_as(dtype), reference.attn.qkv.weight.dequantize(dtype)
    )


class _Block(torch.nn.Module):
    """The shape quantize recognises: ``attn`` with ``qkv`` and ``proj``, and an ``mlp``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn.proj = torch.nn.Linear(3 * dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn.proj(self.attn.qkv(x)))


def test_fp8_leaves_128_by_128_weights_to_the_model_dtype_and_int8_takes_every_layer() -> None:
    """torchao 0.18 mistakes a per-tensor FP8 scale of a 128 x 128 weight for block scaling
    and fails at the first call: FP8 leaves such layers alone, INT8 has no such limit."""
    block = _Block(128)  # its mlp's linear layer is 128 x 128
    everything = transformer_linears(block)
    assert everything == ["attn.qkv", "attn.proj", "mlp.0"]
    assert quantizable_linears(block, "fp8") == ["attn.qkv", "attn.proj"]
    assert quantizable_linears(block, "int8") == everything
    done = quantize_linears(block, "int8", torch.device("cpu"))
    assert (done.layers, done.skipped) == (3, 0)
    assert "left unquantized" not in done.describe()


def test_fp8_on_a_model_whose_linear_layers_are_all_128_by_128_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FP8 cannot run on this CPU; passing over that refusal reaches the check that follows it.
    monkeypatch.setattr(quantize, "check_supported", lambda fmt, device: None)
    block = torch.nn.Module()
    block.attn = torch.nn.Module()
    block.attn.qkv = torch.nn.Linear(128, 128)
    block.attn.proj = torch.nn.Linear(128, 128)
    block.mlp = torch.nn.Sequential(torch.nn.Linear(128, 128))
    with pytest.raises(ModelLoadError, match=r"all 3 of them are 128 x 128.*unset USE_FP8"):
        quantize_linears(block, "fp8", torch.device("cpu"))
    assert type(block.attn.qkv.weight) is torch.nn.Parameter  # nothing was quantized


def test_an_fp32_recompute_runs_through_int8_layers_and_leaves_them_int8() -> None:
    """The segmentor's overflow path (FP16 logits not finite: the frame again in FP32) casts
    the model up for one call and gives it its own tensors back."""
    torch.manual_seed(0)
    block = _Block(32).half()
    quantize_linears(block, "int8", torch.device("cpu"))
    weight = block.attn.qkv.weight
    x = torch.randn(4, 32)
    with torch.inference_mode():
        half = block(x.half())
        with _in_fp32(block):
            full = block(x)
        again = block(x.half())
    assert half.dtype == again.dtype == torch.float16 and full.dtype == torch.float32
    assert block.attn.qkv.weight is weight
    assert isinstance(weight, torchao_quantization.Int8Tensor)
    assert torch.equal(half, again)
    assert torch.allclose(full, half.float(), atol=1e-2)


def test_fp8_is_refused_on_the_cpu_before_any_weight_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before FP8 was refused")

    monkeypatch.setattr(rmbg20_segmentor, "build_model", never)
    with pytest.raises(ModelLoadError) as caught:
        RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", linear_format="fp8")
    message = str(caught.value)
    assert "USE_FP8" in message and "cpu" in message
    assert "8.9" in message and "Unset USE_FP8" in message


def test_fp8_on_an_older_gpu_names_the_gpu_and_its_capability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: fake one of compute capability 8.0 (an A100).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ModelLoadError) as caught:
        check_supported("fp8", torch.device("cuda:0"))
    message = str(caught.value)
    assert "USE_FP8" in message and "cuda:0 (NVIDIA A100, compute capability 8.0)" in message
    assert "Unset USE_FP8" in message


def test_without_torchao_either_setting_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ModelLoadError) as caught:
        RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", linear_format="int8")
    message = str(caught.value)
    assert "USE_INT8" in message and "torchao" in message and "pip install" in message


def test_the_library_imports_and_runs_without_torchao() -> None:
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "import numpy as np\n"
        "from segmentation.factory import build_segmentor\n"
        "from segmentation.config import load_settings\n"
        "import segmentation.quantize\n"
        "s = build_segmentor('rmbg', load_settings({'DEVICE': 'cpu'}),"
        " model='standin:product-birefnet', input_size=128)\n"
        "print(s.precision.name, s.predict([np.zeros((64, 64, 3), np.uint8)])[0].shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "fp32 (64, 64)"


def test_use_int8_reaches_the_segmentor_through_the_factory() -> None:
    settings = load_settings({"USE_INT8": "Enable", "DEVICE": "cpu"})
    segmentor = build_segmentor(
        "rmbg", settings, model=standins.PRODUCT_RMBG, input_size=STANDIN_SIZE
    )
    assert segmentor.precision.name == "fp32+int8-linear"


def test_a_model_without_transformer_blocks_is_refused_by_name() -> None:
    with pytest.raises(ModelLoadError, match="USE_INT8 is set, but the model has no"):
        quantize.quantize_linears(
            torch.nn.Sequential(torch.nn.Linear(4, 4)), "int8", torch.device("cpu")
        )


def test_a_deployment_decides_its_own_linear_format_over_the_environment() -> None:
    """``use_fp8``/``use_int8`` of a deployment's args (build_segmentor's keywords) decide
    both formats when either is given; the environment's apply otherwise."""
    from segmentation.factory import linear_format
    from segmentation_service.config import SegmentorArgs

    env_int8 = load_settings({"DEVICE": "cpu", "USE_INT8": "yes"})
    assert linear_format(env_int8, None, None) == "int8"
    assert linear_format(env_int8, False, None) is None  # an explicit answer wins
    plain = load_settings({"DEVICE": "cpu"})
    assert linear_format(plain, None, True) == "int8"
    overrides = SegmentorArgs(model=standins.PRODUCT_RMBG, use_int8=True).model_overrides()
    built = build_segmentor("rmbg", plain, **{**overrides, "input_size": STANDIN_SIZE})
    assert built.info().precision == "fp32+int8-linear"
    with pytest.raises(ValueError, match="both true"):
        SegmentorArgs(use_fp8=True, use_int8=True)
    with pytest.raises(ValueError, match=r"RMBG-2\.0 only"):
        build_segmentor("yolo", plain, model=standins.PRODUCT_YOLO, use_int8=True)


def test_only_torchaos_per_row_int8_weights_are_cast_back_by_the_layer() -> None:
    with pytest.raises(ValueError, match="per-row INT8"):
        quantize.DequantizingLinear.holding(torch.nn.Linear(4, 3))
