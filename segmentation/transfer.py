"""A batch's outputs from the device to the host in one go.

Copying each frame's output with ``tensor.cpu()`` goes through pageable memory (the driver
stages it) and waits for the device once per frame; on an H200 a batch of 16 RGBA cutouts at
1080p (133 MB) spent about a fifth of its GPU thread's time there (99 ms; 9.6 ms this way,
``benchmarks.cutout_copy``). :func:`copy_to_host` copies them all into one pinned buffer on
a copy stream of each tensor's device, after the work queued on its current stream, without
waiting: the device's copy engine moves them while the next batch computes, and
:meth:`HostCopy.wait` waits for them (once per device). :func:`host_arrays` copies and waits.
Tensors made on another stream than the current one must be synchronised with it by the
caller (as for ``.cpu()``).

The pinned buffer lives until the last array made from it is gone; PyTorch's caching host
allocator then keeps the block (its size rounded up to a power of two) for the next batch.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

T = TypeVar("T")

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


@dataclass
class HostCopy:
    """Host arrays whose copies from the device may still be under way (:func:`copy_to_host`).

    Read :attr:`arrays` only after :meth:`wait`."""

    arrays: list[np.ndarray]
    #: One event per device, recorded on its copy stream after the copies.
    events: list[torch.cuda.Event] = field(default_factory=list)

    def wait(self) -> list[np.ndarray]:
        """The arrays, once every copy is done (the calling thread waits; Python's other
        threads run meanwhile)."""
        for event in self.events:
            event.synchronize()
        return self.arrays


def copy_to_host(tensors: Sequence[torch.Tensor]) -> HostCopy:
    """Each tensor as a host array of its shape and dtype, in order, once :meth:`HostCopy.wait`
    returns. Host tensors are not copied (the arrays share their memory, as
    ``tensor.numpy()``); CUDA tensors are copied into one pinned buffer that their arrays view
    (:func:`staged`), on their device's copy stream, which first waits for the work already
    queued on the device's current stream (the tensors are held for the copy stream: their
    memory is not reused before the copies end). Where pinned memory cannot be had, each is
    copied as ``tensor.cpu()`` would, before this returns."""
    cuda = [index for index, tensor in enumerate(tensors) if tensor.is_cuda]
    arrays: dict[int, np.ndarray] = {}
    events: list[torch.cuda.Event] = []
    if cuda:
        try:
            staging = torch.empty(
                layout([tensors[i] for i in cuda])[1], dtype=torch.uint8, pin_memory=True
            )
        except RuntimeError:  # no pinned memory to be had: the plain copies
            arrays = {i: tensors[i].cpu().numpy() for i in cuda}
        else:
            by_device: dict[torch.device, list[int]] = {}
            for index in cuda:
                by_device.setdefault(tensors[index].device, []).append(index)
            start = 0
            for device, indices in by_device.items():
                group = [tensors[i] for i in indices]
                size = layout(group)[1]
                stream = _copy_stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    arrays.update(
                        zip(indices, staged(group, staging[start : start + size]), strict=True)
                    )
                    for tensor in group:
                        tensor.record_stream(stream)
                    # blocking: a waiting thread sleeps instead of spinning on a core
                    done = torch.cuda.Event(blocking=True)
                    done.record(stream)
                    events.append(done)
                start += size
    return HostCopy(
        [arrays[i] if i in arrays else tensor.cpu().numpy() for i, tensor in enumerate(tensors)],
        events,
    )


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a device's outputs are copied to the host on (one per device)."""
    return torch.cuda.Stream(device)


def host_arrays(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """:func:`copy_to_host`, waited for."""
    return copy_to_host(tensors).wait()


class Arrival(Generic[T]):
    """A batch's outputs, made from a :class:`HostCopy` by ``finish`` once the copy is done.

    :meth:`result` waits for the copy and calls ``finish`` once (whichever thread asks
    first), which makes ``outputs`` outputs of the copied arrays; :meth:`each` gives one
    :class:`Arriving` per output, for callers that answer frame by frame."""

    def __init__(
        self, copy: HostCopy, finish: Callable[[list[np.ndarray]], list[T]], outputs: int
    ) -> None:
        #: The copy and what makes the outputs of it, until :meth:`result` has used them.
        self._pending: tuple[HostCopy, Callable[[list[np.ndarray]], list[T]]] | None = (
            copy,
            finish,
        )
        self.outputs = outputs
        self._lock = threading.Lock()
        self._outputs: list[T] = []
        #: Why the outputs could not be made, raised again to every later caller.
        self._error: Exception | None = None

    def result(self) -> list[T]:
        with self._lock:
            if self._pending is not None:
                copy, finish = self._pending
                # what ``finish`` holds (the outputs still on the device) is freed once used,
                # not when the last frame's answer is
                self._pending = None
                try:
                    self._outputs = finish(copy.wait())
                except Exception as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error
            return self._outputs

    def each(self) -> list[Arriving[T]]:
        return [Arriving(self, index) for index in range(self.outputs)]


@dataclass(frozen=True)
class Arriving(Generic[T]):
    """One output of an :class:`Arrival`."""

    batch: Arrival[T]
    index: int

    def result(self) -> T:
        """The output, once the batch's copy is done (waits for it)."""
        return self.batch.result()[self.index]
