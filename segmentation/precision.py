"""Precision policy shared by every segmentor.

FP16 is used only on a CUDA device that supports it. Everywhere else, or when conversion
fails, the model runs in FP32 and the reason is logged and exposed, so an operator can tell
from ``/v1/models`` and the log which precision is really in use.

RMBG-2.0 can also keep its transformer linear layers in FP8 or INT8 (``USE_FP8``,
``USE_INT8``; :mod:`segmentation.quantize`): :attr:`Precision.linear` says so, and the name
becomes e.g. ``fp16+int8-linear``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

logger = logging.getLogger(__name__)

#: Compute capability from which CUDA has native FP16 arithmetic (Maxwell GM20B / Pascal).
MIN_FP16_CAPABILITY = (5, 3)
#: Compute capability from which CUDA has FP8 (e4m3) tensor-core matmuls: Ada (8.9), Hopper
#: (9.0) and later. ``torch._scaled_mm`` refuses older GPUs.
MIN_FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Precision:
    """The precision a model actually runs in, and why.

    ``dtype`` is what the model's activations and its other weights are in; ``linear`` is
    the lower format (``fp8``, ``int8``) of its transformer linear layers' weights, None
    when they are in ``dtype`` like the rest.
    """

    dtype: torch.dtype
    reason: str
    linear: str | None = None

    @property
    def name(self) -> str:
        """``fp16`` or ``fp32``, followed by ``+fp8-linear`` or ``+int8-linear`` when set."""
        base = "fp16" if self.dtype == torch.float16 else "fp32"
        return f"{base}+{self.linear}-linear" if self.linear else base

    def with_linear(self, linear: str, detail: str) -> Precision:
        """This precision with the transformer linear layers in ``linear``; ``detail`` is
        added to the reason."""
        return replace(self, linear=linear, reason=f"{self.reason}; {detail}")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a torch device.

    A CUDA device always gets an index (the current one), since some CUDA APIs such as the
    per-process memory fraction refuse a bare ``cuda``.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def fp16_unsupported_reason(device: torch.device) -> str | None:
    """Why FP16 cannot run on ``device``, or ``None`` when it can."""
    if device.type != "cuda":
        return f"device is {device.type}, FP16 needs a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_FP16_CAPABILITY:
        return f"GPU compute capability {capability} has no native FP16"
    return None


def fp8_unsupported_reason(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """Why FP8 matmuls cannot run on a device of this type and CUDA compute ``capability``
    (None where there is none: a CPU, or no CUDA), or ``None`` when they can."""
    if device_type != "cuda" or capability is None:
        return (
            f"a {device_type} device has no FP8 matmuls; they need a CUDA GPU of compute "
            "capability 8.9 or newer (Ada, Hopper: an H100 is 9.0)"
        )
    if tuple(capability) < MIN_FP8_CAPABILITY:
        major, minor = capability
        return (
            f"compute capability {major}.{minor} has no FP8 matmuls; they need 8.9 or newer "
            "(Ada, Hopper: an H100 is 9.0)"
        )
    return None


def choose_precision(device: torch.device, use_fp16: bool) -> Precision:
    """The precision a model should be converted to on ``device``."""
    if not use_fp16:
        return Precision(torch.float32, "FP16 disabled by USE_FP16")
    reason = fp16_unsupported_reason(device)
    if reason is not None:
        return Precision(torch.float32, reason)
    return Precision(torch.float16, "FP16 enabled on a CUDA GPU")


def apply_precision(
    module: torch.nn.Module,
    wanted: Precision,
    *,
    success_message: str,
    prepare: Callable[[torch.nn.Module], object] | None = None,
) -> Precision:
    """Convert ``module`` in place to ``wanted.dtype``; fall back to FP32 on failure.

    ``prepare`` runs after ``.half()`` to fix model code that would otherwise break in FP16;
    ``success_message`` is logged verbatim on success (operators grep for it).
    """
    if wanted.dtype != torch.float16:
        logger.info("Model runs in FP32: %s", wanted.reason)
        return wanted
    try:
        module.half()
        if prepare is not None:
            prepare(module)
    except Exception as exc:  # any failure must leave a working FP32 model behind
        module.float()
        logger.warning("FP16 conversion failed, falling back to FP32: %s", exc)
        return Precision(torch.float32, f"FP16 conversion failed: {exc}")
    logger.info(success_message)
    return wanted
