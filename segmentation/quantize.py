"""FP8 or INT8 weights for RMBG-2.0's transformer linear layers (``USE_FP8``, ``USE_INT8``).

Which layers: in every window-attention block, the attention's ``qkv`` and ``proj`` and the
MLP's linear layers (``fc1``, ``fc2``). In the published RMBG-2.0 these are the 24 Swin
blocks' 96 layers: 188.5 M of its 220.2 M parameters and 1,885 of the 2,323 GFLOP a frame
costs at 1024x1024 on the fast path (81%; torch's FLOP counter, docs/benchmarks.md
2026-11-28). Everything else keeps the model's dtype (FP16 on a GPU, FP32 elsewhere): the
patch embedding and merging, norms, the attention itself and the whole decoder.

``fp8``
    torchao's ``Float8DynamicActivationFloat8WeightConfig``, one scale per tensor: weights
    stored as e4m3 with their scale, each activation scaled to e4m3 at every call, the
    product by ``torch._scaled_mm`` in the activation dtype. Per-row scales would fit the
    weights more closely but need BF16 activations, and the model runs in FP16. Needs CUDA
    compute capability 8.9 or newer (:func:`segmentation.precision.fp8_unsupported_reason`);
    anywhere else the model refuses to build. Unfused, the dynamic scaling of every
    activation costs more than the FP8 matmuls save: the setting is here to be measured
    (and compiled), not yet a speed-up. A layer whose weight is exactly 128 x 128 stays in
    the model's dtype: torchao 0.18 reads a per-tensor scale of such a weight as its 128 x
    128 block scaling and fails at the first call ("input_tensor must be 1x128 scaled",
    seen on an H100 with the trained stand-in, whose blocks are 128 wide).
``int8``
    torchao's ``Int8WeightOnlyConfig``: INT8 weights with one scale per output row; the
    activations stay in the model's dtype. Each call casts the weight back to the
    activation's dtype with its scales (one pass over the weight, at most 9.4 M values in
    the published model) and runs the plain product with its bias
    (:class:`DequantizingLinear`). torchao's own weight-only product multiplies the
    product's output by the scales and adds the bias in two more passes over it, holding a
    second copy of it meanwhile: at batch 16 the first stage's ``fc1`` output alone is 1.6
    GB in FP16, which made INT8 slower than FP16 and raised its peak above FP16's
    (docs/benchmarks.md). It takes the same path on a CPU and on any CUDA GPU, and only the
    weights are rounded. Dynamic INT8 activations (torchao's
    ``Int8DynamicActivationInt8WeightConfig``) were measured beside it on a CPU
    (docs/benchmarks.md, 2026-11-28): no closer to FP32 (mean 0.0020 against 0.0015/255 on
    the published architecture, 0.0004 against 0.0002/255 on the stand-in) and 12.7 times
    slower per frame on the published architecture there (torch's integer matmul); on CUDA
    they would quantize every activation unfused, as FP8 does, and torchao 0.18 sends their
    integer matmul to cuBLAS only when K and N are multiples of 8 (to an int32 matmul on
    the host otherwise). Weight-only INT8 keeps those layers' weights in 1 byte instead of 2
    (FP16) or 4 (FP32): the published model's weights took 844 MiB in FP32 on the CPU, 305
    MiB with them in INT8. It saves no FLOPs.

torchao is imported only when one of the settings is on, so the library works without it;
when it is missing the model refuses to build and says what to install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import torch
import torch.nn.functional as F

from segmentation.config import LinearFormat
from segmentation.errors import ModelLoadError
from segmentation.precision import fp8_unsupported_reason

logger = logging.getLogger(__name__)

#: The environment variable that asks for each format (messages name it).
SETTING: dict[str, str] = {"fp8": "USE_FP8", "int8": "USE_INT8"}
#: The torchao release these paths were written and tested against.
TORCHAO_REQUIREMENT = "torchao>=0.18"


@dataclass(frozen=True)
class QuantizedLinears:
    """What :func:`quantize_linears` did: the format, the layers and their weights."""

    format: LinearFormat
    layers: int
    parameters: int
    #: Transformer linear layers left in the model's dtype (:func:`quantizable_linears`).
    skipped: int = 0

    def describe(self) -> str:
        """One line for the precision's reason (``/v1/models``) and the log."""
        left = f"; {self.skipped} left unquantized (128 x 128)" if self.skipped else ""
        return (
            f"{self.layers} transformer linear layers ({self.parameters / 1e6:.1f} M weights) "
            f"in {self.format.upper()} ({SETTING[self.format]}){left}"
        )


def transformer_linears(model: torch.nn.Module) -> list[str]:
    """Qualified names of the layers quantized: in every module with an ``attn`` holding
    ``qkv`` and ``proj`` linear layers and an ``mlp`` (a Swin block), those two and every
    linear layer of the ``mlp``."""
    names: list[str] = []
    for block_name, block in model.named_modules():
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        projections = (getattr(attn, "qkv", None), getattr(attn, "proj", None))
        if not isinstance(mlp, torch.nn.Module) or not all(
            isinstance(layer, torch.nn.Linear) for layer in projections
        ):
            continue
        prefix = f"{block_name}." if block_name else ""
        names += [f"{prefix}attn.qkv", f"{prefix}attn.proj"]
        names += [
            f"{prefix}mlp.{name}"
            for name, layer in mlp.named_modules()
            if isinstance(layer, torch.nn.Linear)
        ]
    return names


#: Weight shapes torchao 0.18 cannot run in FP8 with one scale per tensor (it takes the
#: scale for a 128 x 128 block scale).
FP8_SHAPES_REFUSED = {(128, 128)}


def quantizable_linears(model: torch.nn.Module, fmt: LinearFormat) -> list[str]:
    """The layers of :func:`transformer_linears` that ``fmt`` quantizes."""
    names = transformer_linears(model)
    if fmt != "fp8":
        return names
    return [n for n in names if tuple(_linear(model, n).weight.shape) not in FP8_SHAPES_REFUSED]


def check_supported(fmt: LinearFormat, device: torch.device) -> None:
    """Raise :class:`ModelLoadError` naming the setting, the device and the fix when ``fmt``
    cannot run on ``device`` or torchao is missing; before any weight is loaded."""
    if fmt == "fp8":
        capability: tuple[int, int] | None = None
        described = str(device)
        if device.type == "cuda" and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(device)
            described = (
                f"{device} ({torch.cuda.get_device_name(device)}, "
                f"compute capability {capability[0]}.{capability[1]})"
            )
        elif device.type == "cuda":
            described = f"{device} (CUDA is not available)"
        else:
            described = f"{device} (no CUDA compute capability)"
        reason = fp8_unsupported_reason(device.type, capability)
        if reason is not None:
            raise ModelLoadError(
                f"USE_FP8 is set, but the model's device {described} cannot run it: {reason}. "
                "Unset USE_FP8 (or set it to false); USE_INT8=true runs on any device."
            )
    _torchao(fmt)


def quantize_linears(
    model: torch.nn.Module, fmt: LinearFormat, device: torch.device
) -> QuantizedLinears:
    """Quantize ``model``'s transformer linear layers (:func:`transformer_linears`) to ``fmt``
    in place; the model is on ``device`` and has its serving dtype already."""
    check_supported(fmt, device)
    everything = transformer_linears(model)
    names = set(quantizable_linears(model, fmt))
    if not names:
        why = (
            f"all {len(everything)} of them are 128 x 128, which torchao cannot run in FP8 "
            "with one scale per tensor"
            if everything
            else "no block with attn.qkv, attn.proj and an mlp"
        )
        raise ModelLoadError(
            f"{SETTING[fmt]} is set, but the model has no transformer linear layers to "
            f"quantize ({why}); unset {SETTING[fmt]}"
        )
    parameters = sum(_linear(model, name).weight.numel() for name in names)
    quantization = _torchao(fmt)
    quantization.quantize_(model, _config(quantization, fmt), filter_fn=_named(names))
    if fmt == "int8":
        for name in sorted(names):
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(
                child, DequantizingLinear.holding(_linear(model, name))
            )
    done = QuantizedLinears(fmt, len(names), parameters, len(everything) - len(names))
    logger.info("RMBG-2.0: %s", done.describe())
    return done


class DequantizingLinear(torch.nn.Linear):
    """A linear layer holding torchao's INT8 weight that casts it back to its input's dtype
    at each call and runs the plain product, bias included (``USE_INT8``)."""

    @classmethod
    def holding(cls, linear: torch.nn.Linear) -> DequantizingLinear:
        """A layer with ``linear``'s (quantized) weight and bias, not copies of them: torchao's
        INT8 weight with one scale per output row and no zero point."""
        weight: Any = linear.weight
        zero = getattr(weight, "zero_point", None)
        if tuple(getattr(weight, "block_size", ())) != (1, linear.in_features) or (
            zero is not None and bool(zero.any())
        ):
            raise ValueError(
                f"expected torchao's symmetric per-row INT8 weight, got {type(weight).__name__} "
                f"with block size {getattr(weight, 'block_size', None)}"
            )
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, as the product uses it: each row's INT8 values times its
        scale, in one buffer of ``dtype`` (what torchao's ``dequantize`` gives, without its
        FP32 buffers: these live in a CUDA graph's pool)."""
        weight: Any = self.weight
        # the FP32 scales as they are: the product rounds once, to ``dtype``
        return cast(torch.Tensor, weight.qdata.to(dtype).mul_(weight.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_as(x.dtype), self.bias)


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The layer ``name`` of :func:`transformer_linears` (which names linear layers only)."""
    return cast(torch.nn.Linear, model.get_submodule(name))


def _named(names: set[str]) -> Any:
    def keep(module: torch.nn.Module, fqn: str) -> bool:
        return fqn in names and isinstance(module, torch.nn.Linear)

    return keep


def _config(quantization: ModuleType, fmt: LinearFormat) -> Any:
    # set_inductor_config=False: a model's precision must not change Inductor's global
    # settings for everything else compiled in the process (RMBG_COMPILE's blocks).
    if fmt == "fp8":
        from torchao.quantization.granularity import PerTensor

        return quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=PerTensor(), set_inductor_config=False
        )
    return quantization.Int8WeightOnlyConfig(set_inductor_config=False)


def _torchao(fmt: LinearFormat) -> ModuleType:
    """``torchao.quantization``, or a :class:`ModelLoadError` saying what to install."""
    try:
        import torchao.quantization
    except ImportError as exc:
        raise ModelLoadError(
            f"{SETTING[fmt]} needs the torchao package ({exc}): install it with "
            f"pip install '{TORCHAO_REQUIREMENT}' (part of the project's 'models' extra), "
            f"or unset {SETTING[fmt]}"
        ) from None
    return torchao.quantization
