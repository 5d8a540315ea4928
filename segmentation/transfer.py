"""A batch's outputs from the device to the host in one go.

Copying each frame's output with ``tensor.cpu()`` goes through pageable memory (the driver
stages it) and waits for the device once per frame; on an H200 a batch of 16 RGBA cutouts at
1080p (133 MB) spent about a fifth of its GPU thread's time there (99 ms; 9.6 ms this way,
``benchmarks.cutout_copy``). :func:`host_arrays` copies them all into one pinned buffer,
asynchronously on each tensor's device's current stream, and waits once per device. Tensors
made on another stream must be synchronised with the current one by the caller (as for
``.cpu()``).

The pinned buffer lives until the last array made from it is gone; PyTorch's caching host
allocator then keeps the block (its size rounded up to a power of two) for the next batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Byte alignment of each tensor in the staging buffer (any dtype can be viewed there).
ALIGN = 64


def layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` packed one after another at :data:`ALIGN`, and the bytes
    that holds."""
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return offsets, total


def staged(tensors: Sequence[torch.Tensor], staging: torch.Tensor) -> list[np.ndarray]:
    """Each of ``tensors`` copied (without waiting) into its place in ``staging``, a host
    uint8 buffer of at least :func:`layout`'s bytes, as an array of its shape and dtype that
    views ``staging``. Read them only once the copies are done."""
    offsets, _ = layout(tensors)
    arrays = []
    for tensor, offset in zip(tensors, offsets, strict=True):
        size = tensor.numel() * tensor.element_size()
        view = staging[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor, non_blocking=True)
        arrays.append(view.numpy())
    return arrays


def host_arrays(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor as a host array of its shape and dtype, in order. Host tensors are not
    copied (the arrays share their memory, as ``tensor.numpy()``); CUDA tensors are copied
    into one pinned buffer that their arrays view (:func:`staged`), with one wait per device.
    Where pinned memory cannot be had, each is copied as ``tensor.cpu()`` would."""
    cuda = [tensor for tensor in tensors if tensor.is_cuda]
    copied: list[np.ndarray] = []
    if cuda:
        try:
            staging = torch.empty(layout(cuda)[1], dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # no pinned memory to be had: the plain copies
            copied = [tensor.cpu().numpy() for tensor in cuda]
        else:
            copied = staged(cuda, staging)
            for device in {tensor.device for tensor in cuda}:
                torch.cuda.current_stream(device).synchronize()
    from_cuda = iter(copied)
    return [next(from_cuda) if tensor.is_cuda else tensor.cpu().numpy() for tensor in tensors]
