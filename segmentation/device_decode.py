"""JPEG decoding next to the model: nvJPEG on a CUDA device (torchvision), libjpeg on CPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segmentation.errors import InvalidImageError
from segmentation.imaging import EncodedJPEG


def decode_jpegs_on(device: torch.device, jpegs: Sequence[EncodedJPEG]) -> list[Any]:
    """Decode on ``device`` (nvJPEG on CUDA, libjpeg on CPU): a ``3xHxW`` uint8 tensor per
    image, or an :class:`InvalidImageError` for one that fails, without failing the others."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad image fails the whole call: decode one at a time
    results: list[Any] = []
    for tensor in tensors:
        try:
            results.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            results.append(InvalidImageError(f"corrupt or truncated image: {exc}"))
    return results
