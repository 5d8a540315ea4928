"""Faults injected on purpose, for resilience tests of a running application on a CPU: a
CPU cannot run out of GPU memory, and a real model rarely refuses one frame on demand.

Each is switched on by a ``fault_*`` field of :class:`SegmentorArgs` and never in production.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from segmentation_service.config import SegmentorArgs

logger = logging.getLogger("ray.serve")

Run = Callable[[list[Any]], list[Any]]


def with_faults(run: Run, args: SegmentorArgs, name: str) -> Run:
    """``run`` (a batch of ``Pending`` frames in, outputs out) with the faults ``args`` ask for."""
    if args.fault_oom_above_batch is not None:
        run = _oom_above(run, args.fault_oom_above_batch)
        logger.warning(
            "%s: fault injection on, OOM above batch %d", name, args.fault_oom_above_batch
        )
    if args.fault_fail_frame_value is not None:
        run = _fail_on_value(run, args.fault_fail_frame_value)
        logger.warning(
            "%s: fault injection on, frames of value %d fail", name, args.fault_fail_frame_value
        )
    return run


def _oom_above(run: Run, limit: int) -> Run:
    """``run`` that fails like a full GPU on batches larger than ``limit`` (fault injection)."""

    def faulty(items: list[Any]) -> list[Any]:
        if len(items) > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected: batch {len(items)} > {limit})"
            )
        return run(items)

    return faulty


def _fail_on_value(run: Run, value: int) -> Run:
    """``run`` that raises ValueError for the whole call when any of its frames has every
    pixel equal to ``value``, as a model that cannot take that frame (fault injection)."""

    def poisoned(frame: Any) -> bool:
        return isinstance(frame, np.ndarray) and frame.size > 0 and bool((frame == value).all())

    def faulty(items: list[Any]) -> list[Any]:
        if any(poisoned(item.frame) for item in items):
            raise ValueError(f"injected: the model cannot take a frame of value {value}")
        return run(items)

    return faulty
