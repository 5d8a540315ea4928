"""Run a batch so that no frame is lost to a CUDA out-of-memory error.

Plain PyTorch, no Ray: the serving layer and offline jobs share it. A batch that runs out of
memory is split in halves and retried down to single frames; only a single frame that still
cannot run fails, with :class:`OverloadedError` (retryable). Each OOM lowers an
adaptive cap on the batch size, which recovers slowly after sustained success.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from segmentation.errors import OverloadedError

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


@dataclass
class BatchReport:
    """What happened to one submitted batch."""

    oom_splits: int = 0
    failed_frames: int = 0
    largest_run: int = 0


class OOMSafeRunner(Generic[In, Out]):
    """Calls ``run(items)`` in pieces no larger than the cap, splitting further on OOM."""

    def __init__(self, run: Callable[[list[In]], list[Out]], cap: AdaptiveBatchCap) -> None:
        self._run = run
        self.cap = cap

    def __call__(self, items: Sequence[In]) -> tuple[list[Out | OverloadedError], BatchReport]:
        report = BatchReport()
        results: list[Out | OverloadedError] = []
        pending = list(items)
        while pending:
            size = min(len(pending), max(1, self.cap.value))
            chunk, pending = pending[:size], pending[size:]
            results.extend(self._run_split(chunk, report))
        return results, report

    def _run_split(self, chunk: list[In], report: BatchReport) -> list[Out | OverloadedError]:
        try:
            outputs = self._run(chunk)
        except Exception as exc:
            if not is_oom(exc):
                raise
            outputs = None
        if outputs is None:
            # Retry only after the except block: until then the exception's traceback keeps
            # the failed attempt's activations alive, and the halves would OOM on them too.
            free_cached_memory()
            self.cap.on_oom(len(chunk))
            if len(chunk) == 1:
                report.failed_frames += 1
                logger.warning(
                    "a single frame ran out of GPU memory; it fails as overloaded (retryable)"
                )
                return [OverloadedError("GPU out of memory for this frame; retry later", 2)]
            report.oom_splits += 1
            half = len(chunk) // 2
            logger.warning(
                "GPU OOM at batch %d: retrying as %d + %d", len(chunk), half, len(chunk) - half
            )
            return self._run_split(chunk[:half], report) + self._run_split(chunk[half:], report)
        report.largest_run = max(report.largest_run, len(chunk))
        self.cap.on_success(len(chunk))
        return list(outputs)


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
