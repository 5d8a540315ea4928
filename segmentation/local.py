"""A segmentor in this process for scripts and batch jobs: frames in, mattes out, OOM-safe."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segmentation.batching import AdaptiveBatchCap, OOMSafeRunner
from segmentation.encoders import union_matte
from segmentation.models.base import Segmentor
from segmentation.options import DetectOptions, ModelKind


@dataclass(frozen=True)
class FrameOutput:
    """One frame's result: a uint8 ``HxW`` alpha matte, plus the instances for YOLO."""

    alpha: np.ndarray
    instances: list[dict[str, Any]] | None = None


class LocalRunner:
    """Runs ``segmentor`` on batches of at most ``batch_size`` frames, halving them on CUDA OOM.

    RMBG-2.0's matte is its alpha; for YOLO11-seg the alpha is the union of the instance
    masks (255 inside any object), and the instances come along. A single frame that does not
    fit the GPU raises :class:`segmentation.errors.OverloadedError`.

    On CUDA a batch smaller than the current cap (a video's last one) runs padded to the cap:
    cuDNN builds its plans per batch size, 1.6-2.7 s for each new one on an H100 (see
    :func:`segmentation.batching.batch_buckets`), so a run builds them once, on its first
    batch, and needs no warm-up of its own. Nothing else is built ahead: no other batch
    sizes, no CUDA graphs.
    """

    def __init__(
        self,
        kind: ModelKind,
        segmentor: Segmentor,
        *,
        batch_size: int = 8,
        detect: DetectOptions | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        self.kind = kind
        self.segmentor = segmentor
        self.detect = detect or DetectOptions()
        self.cuda_graphs = cuda_graphs and segmentor.device.type == "cuda"
        #: Seconds the CUDA-graph capture took (None: not tried yet, or not asked for).
        self.graph_seconds: float | None = None
        self._batches = 0
        self._runner = OOMSafeRunner(self._run, AdaptiveBatchCap(batch_size))

    def __call__(self, frames: Sequence[np.ndarray]) -> list[FrameOutput]:
        results, _ = self._runner(list(frames))
        outputs: list[FrameOutput] = []
        for result in results:
            if isinstance(result, Exception):
                raise result
            outputs.append(result)
        return outputs

    def _run(self, frames: list[np.ndarray]) -> list[FrameOutput]:
        if self.segmentor.device.type == "cuda":
            self.segmentor.batch_buckets = (self._runner.cap.value,)
            if self.cuda_graphs and self._batches and self.graph_seconds is None:
                self._capture(frames)
        self._batches += 1
        if self.kind == "rmbg":
            return [FrameOutput(alpha) for alpha in self.segmentor.predict(frames)]
        found = self.segmentor.predict(frames, [self.detect] * len(frames))
        outputs = []
        for detections in found:
            matte = union_matte(
                detections.height, detections.width, (i.mask for i in detections.instances)
            )
            outputs.append(FrameOutput(matte, [i.as_dict() for i in detections.instances]))
        return outputs

    def _capture(self, frames: list[np.ndarray]) -> None:
        started = time.perf_counter()
        sizes = (self._runner.cap.value,)
        segmentor: Any = self.segmentor  # both segmentors capture; their frame inputs differ
        if self.kind == "rmbg":
            segmentor.capture_graphs(sizes)
        else:
            height, width = frames[0].shape[:2]
            segmentor.capture_graphs((int(height), int(width)), sizes)
        self.graph_seconds = time.perf_counter() - started
