"""A batch's outputs from the device to the host in one go.

Copying each frame's output with ``tensor.cpu()`` waits for the device once per frame and
goes through pageable memory (the driver stages it); on an H200 a batch of 16 RGBA cutouts at
1080p (133 MB) spent about a fifth of its GPU thread's time there. :func:`host_arrays` copies
them all into one pinned buffer, asynchronously on the current stream, and waits once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Byte alignment of each tensor in the staging buffer (any dtype can be viewed there).
_ALIGN = 64


def host_arrays(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor as a host array of its shape and dtype, in order. Host tensors are not
    copied (the arrays share their memory, as ``tensor.numpy()``); CUDA tensors are copied
    into one pinned buffer that the arrays share (freed when the last of them is), with
    one wait for the device. Where pinned memory cannot be had, each is copied as
    ``tensor.cpu()`` would."""
    arrays: list[np.ndarray | None] = [None] * len(tensors)
    on_cuda = [i for i, t in enumerate(tensors) if t.is_cuda]
    for i, tensor in enumerate(tensors):
        if not tensor.is_cuda:
            arrays[i] = tensor.cpu().numpy()
    if on_cuda:
        offsets, total = [], 0
        for i in on_cuda:
            offsets.append(total)
            total += -(-tensors[i].numel() * tensors[i].element_size() // _ALIGN) * _ALIGN
        try:
            staging = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # no pinned memory to be had: the plain copies
            staging = None
        for i, offset in zip(on_cuda, offsets, strict=True):
            tensor = tensors[i]
            if staging is None:
                arrays[i] = tensor.cpu().numpy()
                continue
            size = tensor.numel() * tensor.element_size()
            view = staging[offset : offset + size].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor, non_blocking=True)
            arrays[i] = view.numpy()
        if staging is not None:
            for device in {tensors[i].device for i in on_cuda}:
                torch.cuda.current_stream(device).synchronize()
    done = [a for a in arrays if a is not None]
    assert len(done) == len(tensors)
    return done
