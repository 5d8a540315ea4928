"""What every segmentor offers to the serving layer."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from segmentation.precision import Precision


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from and how it runs; shown by ``GET /v1/models``."""

    name: str
    source: str
    revision: str | None
    precision: str
    precision_reason: str
    device: str
    stand_in: bool
    #: For a stand-in, what its weights are (trained on synthetic scenes, or random).
    stand_in_weights: str | None = None
    #: How the forward runs, e.g. ``eager`` or ``sdpa+windows+decoder+graphs``.
    inference_path: str = "eager"
    #: RMBG-2.0's compiled parts (``RMBG_COMPILE``: blocks, decoder): whether they were compiled
    #: at start-up, from an artifact (``RMBG_COMPILE_CACHE``), or not at all and why; None
    #: when not asked.
    compile: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: A uint8 ``HxWx3`` RGB array, or a uint8 ``3xHxW`` tensor already decoded on a device.
Frame = np.ndarray | torch.Tensor


def frame_size(frame: Frame) -> tuple[int, int]:
    """(height, width) of an ``HxWx3`` uint8 array or a ``3xHxW`` uint8 tensor; ValueError
    for anything else (the model refuses the frame, alone)."""
    if isinstance(frame, torch.Tensor):
        if frame.ndim != 3 or frame.shape[0] != 3 or frame.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 3xHxW tensor, got {frame.dtype} {tuple(frame.shape)}"
            )
        return int(frame.shape[1]), int(frame.shape[2])
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 RGB frame, got {frame.dtype} {frame.shape}")
    return int(frame.shape[0]), int(frame.shape[1])


class Segmentor(Protocol):
    """A model that takes a list of uint8 RGB frames and returns one result per frame.

    ``RMBG20Segmentor`` (a uint8 matte per frame) and ``YoloSegmentor`` (``Detections`` per
    frame, with per-frame ``DetectOptions``) implement it; ``LocalRunner`` and the replicas
    hold one.
    """

    device: torch.device
    precision: Precision
    #: Batch sizes the model pads its batches to (None: run each batch at its own size).
    batch_buckets: tuple[int, ...] | None

    def predict(self, frames: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]: ...

    def info(self) -> ModelInfo: ...


def gpu_memory(device: torch.device) -> dict[str, int]:
    """Allocated, reserved and peak bytes of this process on ``device`` (zeros on CPU)."""
    if device.type != "cuda":
        return {"allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0}
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "peak_bytes": torch.cuda.max_memory_allocated(device),
    }


class StageClock:
    """Seconds per step of a model call, added into ``timings`` (a no-op when it is None).

    On a GPU each lap waits for the work queued on the device's current stream, so a step's
    kernels count for that step (copies under way on another stream do not).
    """

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.device = device
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def host_batch(arrays: Sequence[np.ndarray], pin: bool) -> torch.Tensor:
    """Same-shape arrays stacked into one (page-locked, when ``pin``) host tensor.

    Each frame is copied once, straight into the pinned buffer (PyTorch caches those), so
    the upload that follows is a single asynchronous DMA; ``np.stack`` then ``pin_memory``
    would copy every frame twice.
    """
    batch = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=pin)
    view = batch.numpy()
    for index, array in enumerate(arrays):
        np.copyto(view[index], array)
    return batch


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def weights_sha256(path: Path) -> str | None:
    """sha256 of a local model's weights (``model.safetensors`` of a directory, or a ``.pt``
    file); None where there is no such file. Remembered per file, size and mtime: a replica
    asks more than once."""
    weights = path / "model.safetensors" if path.is_dir() else path
    if weights.suffix not in (".safetensors", ".pt") or not weights.is_file():
        return None
    stat = weights.stat()
    return _file_sha256(weights.resolve(), stat.st_size, stat.st_mtime_ns)
