"""JPEG decoding next to the model: nvJPEG on a CUDA device (torchvision), libjpeg on CPU."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from segmentation.batching import is_oom
from segmentation.errors import InvalidImageError
from segmentation.imaging import EncodedImage

# The decoders read each image's bytes in place: torch.frombuffer warns (once a process) that
# they are read-only, which only matters to a writer. The copy into a bytearray this made
# first: its line was 8.6% of a YOLO replica's samples (py-spy) on a busy four-card host
# (docs/benchmarks.md, "Four H200s with two YOLO replicas a card").
warnings.filterwarnings(
    "ignore",
    message="The given buffer is not writable",
    category=UserWarning,
    module=re.escape(__name__) + "$",
)


def decode_jpegs_on(device: torch.device, jpegs: Sequence[EncodedImage]) -> list[Any]:
    """Decode on ``device`` (nvJPEG on CUDA, libjpeg on CPU): a ``3xHxW`` uint8 tensor per
    image, or an :class:`InvalidImageError` for one that fails, without failing the others.

    A GPU out-of-memory error is not the image's fault: it is raised (``torch.OutOfMemoryError``
    is a ``RuntimeError``, as nvJPEG's decode errors are), so the OOM-safe runner splits the
    batch and a frame that cannot get memory even alone is answered 503, not 400.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(j.data, dtype=torch.uint8) for j in jpegs]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as exc:
        if is_oom(exc):
            raise
        # one bad image fails the whole call: decode one at a time
    results: list[Any] = []
    for tensor in tensors:
        try:
            results.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            if is_oom(exc):
                raise
            results.append(InvalidImageError(f"corrupt or truncated image: {exc}"))
    return results
