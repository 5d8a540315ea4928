"""Per-call options of the models that the service layer passes through (no torch here:
the router imports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelKind = Literal["rmbg", "yolo"]
MODEL_KINDS: tuple[ModelKind, ...] = ("rmbg", "yolo")

#: What background removal answers per frame: an RGBA cutout PNG, a grayscale matte PNG, or
#: the matte's raw bytes (``HxW`` uint8, row-major: gRPC's ``RAW_ALPHA``).
Output = Literal["rgba", "mask", "raw"]
OUTPUTS: tuple[Output, ...] = ("rgba", "mask", "raw")


@dataclass(frozen=True)
class DetectOptions:
    """Per-call thresholds, validated."""

    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[int, ...] | None = None
    max_det: int = 300

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be between 0 and 1, got {self.conf}")
        if not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"iou must be between 0 and 1, got {self.iou}")
        if not 1 <= self.max_det <= 1000:
            raise ValueError(f"max_det must be between 1 and 1000, got {self.max_det}")
