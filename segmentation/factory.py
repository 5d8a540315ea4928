"""Build a segmentor from settings plus per-caller overrides (service, CLI and batch jobs)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from segmentation.config import LinearFormat, Settings
from segmentation.models import rmbg20_fast
from segmentation.models.rmbg20_segmentor import CompileArtifacts, LoadFormat, RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.options import MODEL_KINDS, ModelKind

logger = logging.getLogger(__name__)


def build_segmentor(
    kind: ModelKind,
    settings: Settings,
    *,
    model: str | None = None,
    device: str | None = None,
    use_fp16: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool | None = None,
    input_size: int | None = None,
    load_format: LoadFormat = "auto",
    use_fp8: bool | None = None,
    use_int8: bool | None = None,
    compile_artifacts: CompileArtifacts = "use",
) -> RMBG20Segmentor | YoloSegmentor:
    """The ``kind`` segmentor; each argument left as None takes its value from ``settings``
    (``use_fp8`` and ``use_int8`` together: setting either decides both).
    ``compile_artifacts``: see :class:`RMBG20Segmentor`."""
    fp16 = settings.use_fp16 if use_fp16 is None else use_fp16
    linear = linear_format(settings, use_fp8, use_int8)
    if kind == "rmbg":
        if settings.rmbg_compile_cache and not settings.rmbg_compile:
            logger.warning(
                "RMBG_COMPILE_CACHE is set but RMBG_COMPILE is not: nothing compiles, the "
                "artifacts in %s are not used",
                settings.rmbg_compile_cache,
            )
        return RMBG20Segmentor(
            model or settings.rmbg_model,
            device=device or settings.device,
            use_fp16=fp16,
            revision=revision or settings.rmbg_revision,
            trust_remote_code=(
                settings.rmbg_trust_remote_code if trust_remote_code is None else trust_remote_code
            ),
            token=settings.hf_token,
            load_format=load_format,
            input_size=input_size or settings.rmbg_input_size,
            optimized=rmbg_steps(settings),
            linear_format=linear,
            compile_cache=settings.rmbg_compile_cache if settings.rmbg_compile else None,
            compile_artifacts=compile_artifacts,
        )
    if kind == "yolo":
        if use_fp8 or use_int8:
            raise ValueError("use_fp8 and use_int8 apply to RMBG-2.0 only, not to YOLO")
        return YoloSegmentor(
            model or settings.yolo_model,
            device=device or settings.device,
            use_fp16=fp16,
            imgsz=input_size or settings.yolo_imgsz,
        )
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def linear_format(
    settings: Settings, use_fp8: bool | None, use_int8: bool | None
) -> LinearFormat | None:
    """RMBG-2.0's linear-layer format: a caller's ``use_fp8``/``use_int8`` when either is
    given (both true refused), else the settings' (``USE_FP8``, ``USE_INT8``)."""
    if use_fp8 is None and use_int8 is None:
        return settings.linear_format
    if use_fp8 and use_int8:
        raise ValueError("use_fp8 and use_int8 are both true: choose one")
    if use_fp8:
        return "fp8"
    return "int8" if use_int8 else None


def rmbg_steps(settings: Settings) -> bool | Sequence[str]:
    """RMBG-2.0's inference path from the settings: the fast path's default steps, with the
    compiled parts under ``RMBG_COMPILE``, or the published eager code."""
    if not settings.rmbg_optimized:
        return False
    if settings.rmbg_compile:
        compiled = (
            step
            for step, part in rmbg20_fast.COMPILED_STEPS.items()
            if part in settings.rmbg_compile
        )
        # compiled blocks replace the blocks' Triton kernels there (rmbg20_fast.optimize)
        return (*rmbg20_fast.DEFAULT_STEPS, *compiled)
    return True
