"""Build a segmentor from settings plus per-caller overrides (service, CLI and batch jobs)."""

from __future__ import annotations

from collections.abc import Sequence

from segmentation.config import Settings
from segmentation.models import rmbg20_fast
from segmentation.models.rmbg20_segmentor import LoadFormat, RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.options import MODEL_KINDS, ModelKind


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
) -> RMBG20Segmentor | YoloSegmentor:
    """The ``kind`` segmentor; each argument left as None takes its value from ``settings``."""
    fp16 = settings.use_fp16 if use_fp16 is None else use_fp16
    if kind == "rmbg":
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
            linear_format=settings.linear_format,
        )
    if kind == "yolo":
        return YoloSegmentor(
            model or settings.yolo_model,
            device=device or settings.device,
            use_fp16=fp16,
            imgsz=input_size or settings.yolo_imgsz,
        )
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def rmbg_steps(settings: Settings) -> bool | Sequence[str]:
    """RMBG-2.0's inference path from the settings: the fast path's default steps, with the
    compiled blocks under ``RMBG_COMPILE``, or the published eager code."""
    if not settings.rmbg_optimized:
        return False
    if settings.rmbg_compile:
        return (*rmbg20_fast.DEFAULT_STEPS, rmbg20_fast.COMPILE)
    return True
