"""Run a batch so that no frame is lost to a CUDA out-of-memory error or to another frame.

Plain PyTorch, no Ray: the serving layer and offline jobs share it. A batch that runs out of
memory is split in halves and retried down to single frames; only a single frame that still
cannot run fails, with :class:`OverloadedError` (retryable). Each OOM lowers an
adaptive cap on the batch size, which recovers slowly after sustained success.

Any other exception of the model is split the same way, because one frame the model cannot
take (a shape it rejects, a value that breaks a kernel) would otherwise fail every frame
merged with it: up to 63 innocent frames per bad one at batch 64. Halving finds the culprit in
``2 * log2(n)`` extra calls and every other frame gets its result. The frame that still fails
alone gets an error of its own: :class:`FrameRejectedError` (the caller's frame: a 4xx in the
service) where the model refused its input (``ValueError``, ``IndexError``), a plain
:class:`SegmentationError` (a server fault) for anything else. Such errors do not lower the
cap: they say nothing about memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from segmentation.errors import InvalidImageError, OverloadedError, SegmentationError

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM, or an allocation failure that cuDNN/cuBLAS report as a RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
        or "CUDNN_STATUS_ALLOC_FAILED" in text
        or "OutOfMemoryError" in text
    )


def free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class AdaptiveBatchCap:
    """The largest batch the model may run now: halves on OOM, grows by one after success.

    ``ceiling`` is the configured ``max_batch_size`` (or the memory-derived cap, if lower);
    the live cap never exceeds it. ``recover_after`` consecutive successful batches at the
    cap raise it by one.
    """

    def __init__(self, ceiling: int, recover_after: int = 50) -> None:
        self._lock = threading.Lock()
        self.ceiling = ceiling
        self.value = ceiling
        self.recover_after = recover_after
        self._successes = 0

    def set_ceiling(self, ceiling: int) -> None:
        """A new configured maximum: the live cap starts again from it."""
        with self._lock:
            self.ceiling = max(1, ceiling)
            self.value = self.ceiling
            self._successes = 0

    def on_oom(self, batch_size: int) -> None:
        with self._lock:
            self.value = max(1, min(self.value, batch_size // 2 or 1))
            self._successes = 0

    def on_success(self, batch_size: int) -> None:
        with self._lock:
            if batch_size < self.value or self.value >= self.ceiling:
                return
            self._successes += 1
            if self._successes >= self.recover_after:
                self.value += 1
                self._successes = 0


class FrameRejectedError(InvalidImageError):
    """The model could not take this frame (its shape or content); the others in its batch ran."""

    code = "frame_rejected"


#: Exceptions of a model that say the input, not the server, is wrong.
BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, IndexError)


def frame_error(exc: Exception) -> SegmentationError:
    """The error one frame that failed alone gets: its own if typed, else by the kind of fault."""
    if isinstance(exc, SegmentationError):
        return exc
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, BAD_INPUT_ERRORS):
        return FrameRejectedError(f"the model cannot take this frame ({detail})")
    return SegmentationError(f"the model failed on this frame ({detail})")


@dataclass
class BatchReport:
    """What happened to one submitted batch."""

    oom_splits: int = 0
    #: Frames that failed alone for lack of GPU memory (answered :class:`OverloadedError`).
    failed_frames: int = 0
    largest_run: int = 0
    #: Batches split because the model raised something else than an OOM.
    error_splits: int = 0
    #: Frames the model refused alone (answered :class:`FrameRejectedError`).
    rejected_frames: int = 0
    #: Frames that failed alone for a server fault (answered :class:`SegmentationError`).
    error_frames: int = 0
    #: Every model call, in order: the batch sizes the runner tried.
    calls: list[int] = field(default_factory=list)


class OOMSafeRunner(Generic[In, Out]):
    """Calls ``run(items)`` in pieces no larger than the cap, splitting further on a failure.

    Returns one entry per item, in order: its output, or the :class:`SegmentationError` it got
    (see the module docstring); never raises for a model error.
    """

    def __init__(self, run: Callable[[list[In]], list[Out]], cap: AdaptiveBatchCap) -> None:
        self._run = run
        self.cap = cap

    def __call__(self, items: Sequence[In]) -> tuple[list[Out | SegmentationError], BatchReport]:
        report = BatchReport()
        results: list[Out | SegmentationError] = []
        pending = list(items)
        while pending:
            size = min(len(pending), max(1, self.cap.value))
            chunk, pending = pending[:size], pending[size:]
            results.extend(self._run_split(chunk, report))
        return results, report

    def _run_split(self, chunk: list[In], report: BatchReport) -> list[Out | SegmentationError]:
        report.calls.append(len(chunk))
        failure: SegmentationError | None = None
        oom = False
        outputs: list[Out | SegmentationError] = []
        try:
            outputs = list(self._run(chunk))
        except Exception as exc:
            oom = is_oom(exc)
            if len(chunk) == 1 and not oom:
                logger.warning("the model failed on a single frame", exc_info=True)
            failure = frame_error(exc)  # a new exception: the traceback is not kept
        if failure is None:
            report.largest_run = max(report.largest_run, len(chunk))
            self.cap.on_success(len(chunk))
            return outputs
        # Retry only after the except block: until then the exception's traceback keeps
        # the failed attempt's activations alive, and the halves would OOM on them too.
        if oom:
            free_cached_memory()
            self.cap.on_oom(len(chunk))
        if len(chunk) == 1:
            if oom:
                report.failed_frames += 1
                logger.warning(
                    "a single frame ran out of GPU memory; it fails as overloaded (retryable)"
                )
                return [OverloadedError("GPU out of memory for this frame; retry later", 2)]
            if isinstance(failure, InvalidImageError):
                report.rejected_frames += 1
            else:
                report.error_frames += 1
            return [failure]
        half = len(chunk) // 2
        if oom:
            report.oom_splits += 1
            logger.warning(
                "GPU OOM at batch %d: retrying as %d + %d", len(chunk), half, len(chunk) - half
            )
        else:
            report.error_splits += 1
            logger.warning(
                "model error at batch %d (%s): retrying as %d + %d to find the frame",
                len(chunk),
                failure,
                half,
                len(chunk) - half,
            )
        del failure
        return self._run_split(chunk[:half], report) + self._run_split(chunk[half:], report)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a model is run at, up to ``max_batch``: 1, 2, 4, 8, 12, 16, 24, 32, 48...

    cuDNN builds its execution plans per input shape, and a new batch size costs 1.6-2.7 s
    on an H100 for YOLO11n-seg (7-11 ms once built). Padding each batch up to the next of
    these sizes keeps the set of shapes small enough to build them all during warm-up, at
    most a third of a batch of padding.
    """
    sizes = {max_batch}
    power = 1
    while power < max_batch:
        sizes.add(power)
        if power >= 8 and power * 3 // 2 < max_batch:
            sizes.add(power * 3 // 2)
        power *= 2
    return tuple(sorted(sizes))


def pad_to_bucket(batch: torch.Tensor, buckets: Sequence[int] | None) -> torch.Tensor:
    """``batch`` with zero frames appended up to the smallest bucket that holds it."""
    size = batch.shape[0]
    target = next((b for b in sorted(buckets or ()) if b >= size), size)
    if target == size:
        return batch
    padding = batch.new_zeros((target - size, *batch.shape[1:]))
    return torch.cat((batch, padding))


def bounded_runs(sizes: Sequence[int], budget: int) -> list[slice]:
    """Consecutive items whose ``sizes`` add up to at most ``budget`` together, each run as a
    slice of the items (an item over the budget is a run of its own)."""
    runs: list[slice] = []
    start = 0
    while start < len(sizes):
        stop, held = start + 1, sizes[start]
        while stop < len(sizes) and held + sizes[stop] <= budget:
            held += sizes[stop]
            stop += 1
        runs.append(slice(start, stop))
        start = stop
    return runs
