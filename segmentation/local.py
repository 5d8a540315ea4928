"""A segmentor in this process for scripts and batch jobs: frames in, mattes out, OOM-safe."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segmentation.batching import AdaptiveBatchCap, OOMSafeRunner
from segmentation.encoders import union_matte
from segmentation.models.base import Segmentor
from segmentation.options import CutoutOptions, DetectOptions, ModelKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameOutput:
    """One frame's result: a uint8 ``HxW`` alpha matte, plus the instances for YOLO, or the
    RGBA cutout with its edge colours refined (``LocalRunner(refine=True)``)."""

    alpha: np.ndarray
    instances: list[dict[str, Any]] | None = None
    #: uint8 ``HxWx4``: the foreground's estimated colours under ``alpha`` (which is its
    #: alpha channel exactly), ``(0, 0, 0, 0)`` where ``alpha`` is 0.
    cutout: np.ndarray | None = None


class LocalRunner:
    """Runs ``segmentor`` on batches of at most ``batch_size`` frames, halving them on CUDA OOM.

    RMBG-2.0's matte is its alpha; for YOLO11-seg the alpha is the union of the instance
    masks (255 inside any object), and the instances come along. A single frame that does not
    fit the GPU raises :class:`segmentation.errors.OverloadedError`.

    On CUDA a batch smaller than the current cap (a video's last one) runs padded to the cap:
    cuDNN builds its plans per batch size, 1.6-2.7 s for each new one on an H100 (see
    :func:`segmentation.batching.batch_buckets`), so a run builds them once, on its first
    batch, and needs no warm-up of its own. Nothing else is built ahead: no other batch
    sizes.

    ``cuda_graphs`` (CUDA only): before the second batch, capture a CUDA graph of the model
    at the cap (one launch per batch instead of hundreds; the first batch's outputs are
    already out, so the time to the first frame does not change). ``graph_seconds`` says how
    long the capture took, ``graph_error`` why it failed: a capture that fails (e.g. out of
    memory) is not tried again and leaves eager runs; a batch of another shape (a cap halved
    after an OOM, YOLO frames of another size) runs eagerly.

    ``quick_start`` (CUDA only): attention runs on PyTorch's own fused kernels instead of
    cuDNN's, which builds a plan per input shape: RMBG-2.0's first batch of 16 at 1080p took
    0.97 s instead of 1.68, and every later one 2.3% longer (49.3 vs 50.5 frames/s, H200,
    the same mattes within 1/255). Worth it for a run that starts, segments a clip and exits
    (``segment-video``; the two cross at ~1400 frames); a long job keeps cuDNN's.

    ``refine`` (RMBG-2.0 only): each frame's cutout with the foreground's own colour
    estimated at soft edges (:func:`segmentation.refine.estimate_foreground`), composed on
    the model's device where the frame and its matte already are, as the service composes
    ``refine=true``; only the finished ``HxWx4`` cutout is copied to the host.
    """

    def __init__(
        self,
        kind: ModelKind,
        segmentor: Segmentor,
        *,
        batch_size: int = 8,
        detect: DetectOptions | None = None,
        cuda_graphs: bool = False,
        quick_start: bool = False,
        refine: bool = False,
    ) -> None:
        if refine and kind != "rmbg":
            raise ValueError(f"refine needs a soft matte (rmbg); {kind}'s masks are hard")
        self.kind = kind
        self.refine = refine
        self.segmentor = segmentor
        self.detect = detect or DetectOptions()
        self.cuda_graphs = cuda_graphs and segmentor.device.type == "cuda"
        self.quick_start = quick_start and segmentor.device.type == "cuda"
        #: Seconds the CUDA-graph capture took (None: not tried yet, or not asked for).
        self.graph_seconds: float | None = None
        #: Why the capture failed (None: it did not, or was not tried); batches run eagerly.
        self.graph_error: str | None = None
        self._done = 0  # batches that returned
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
        with self._attention():  # the capture too: the graph keeps the kernels it recorded
            if self.segmentor.device.type == "cuda":
                self.segmentor.batch_buckets = (self._runner.cap.value,)
                if self.cuda_graphs and self._done and self.graph_seconds is None:
                    self._capture(frames)
            outputs = self._predict(frames)
        self._done += 1
        return outputs

    def _attention(self) -> contextlib.AbstractContextManager[None]:
        """The attention kernels this run may use (see ``quick_start``)."""
        if not self.quick_start:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        )

    def _predict(self, frames: list[np.ndarray]) -> list[FrameOutput]:
        if self.kind == "rmbg" and self.refine:
            segmentor: Any = self.segmentor  # RMBG20Segmentor: composes on its device
            refined = segmentor.predict_outputs(frames, [CutoutOptions(refine=True)] * len(frames))
            return [FrameOutput(out.pixels[..., 3], cutout=out.pixels) for out in refined]
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
        """Tried once; whatever fails (out of memory included) leaves eager runs."""
        started = time.perf_counter()
        sizes = (self._runner.cap.value,)
        segmentor: Any = self.segmentor  # both segmentors capture; their frame inputs differ
        try:
            if self.kind == "rmbg":
                captured = segmentor.capture_graphs(sizes)
            else:
                height, width = frames[0].shape[:2]
                captured = segmentor.capture_graphs((int(height), int(width)), sizes)
            if not captured:
                self.graph_error = getattr(segmentor, "graph_error", None) or "not captured"
        except Exception as exc:
            self.graph_error = f"{type(exc).__name__}: {exc}"[:500]
            logger.warning("CUDA graphs unavailable (%s); running eagerly", self.graph_error)
        finally:
            self.graph_seconds = time.perf_counter() - started
