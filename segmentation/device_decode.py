"""JPEG decoding next to the model: nvJPEG on a CUDA device (torchvision), libjpeg on CPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segmentation.batching import is_oom
from segmentation.errors import InvalidImageError
from segmentation.imaging import EncodedImage


def decode_jpegs_on(device: torch.device, jpegs: Sequence[EncodedImage]) -> list[Any]:
    """Decode on ``device`` (nvJPEG on CUDA, libjpeg on CPU): a ``3xHxW`` uint8 tensor per
    image, or an :class:`InvalidImageError` for one that fails, without failing the others.

    A GPU out-of-memory error is not the image's fault: it is raised (``torch.OutOfMemoryError``
    is a ``RuntimeError``, as nvJPEG's decode errors are), so the OOM-safe runner splits the
    batch and a frame that cannot get memory even alone is answered 503, not 400.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
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
