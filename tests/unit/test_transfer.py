"""Outputs to the host: the staging layout and copies (here into a plain host buffer; into
pinned memory from CUDA in tests/gpu/test_transfer_gpu.py), host tensors left uncopied, and
RMBG-2.0's postprocess leaving the caller's logits as they were."""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.transfer import (
    ALIGN,
    Arrival,
    HostCopy,
    copy_to_host,
    host_arrays,
    layout,
    staged,
)


def _tensors() -> list[torch.Tensor]:
    return [
        torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4),
        torch.linspace(-1, 1, 7, dtype=torch.float32),  # 28 bytes: the next starts aligned
        torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # not contiguous
        torch.empty((0, 5), dtype=torch.uint8),
        torch.tensor([[True, False, True]]),
        torch.full((3,), 1.5, dtype=torch.float16),
        torch.tensor(7, dtype=torch.int32),  # no dimensions
    ]


def test_the_layout_packs_each_tensor_aligned_without_overlap() -> None:
    tensors = _tensors()
    offsets, total = layout(tensors)
    sizes = [t.numel() * t.element_size() for t in tensors]
    assert all(offset % ALIGN == 0 for offset in offsets)
    ends = [offset + size for offset, size in zip(offsets, sizes, strict=True)]
    assert all(end <= start for end, start in zip(ends[:-1], offsets[1:], strict=True))
    assert ends[-1] <= total < ends[-1] + ALIGN


def test_staged_copies_are_views_of_the_buffer_with_each_tensors_values() -> None:
    tensors = _tensors()
    staging = torch.full((layout(tensors)[1],), 0xAB, dtype=torch.uint8)
    arrays = staged(tensors, staging)
    buffer = staging.numpy()
    for array, tensor in zip(arrays, tensors, strict=True):
        assert array.shape == tuple(tensor.shape) and array.dtype == tensor.numpy().dtype
        np.testing.assert_array_equal(array, tensor.numpy())
        assert array.size == 0 or np.shares_memory(array, buffer)
        assert array.flags.c_contiguous


def test_host_tensors_come_back_uncopied_and_in_order() -> None:
    tensors = _tensors()
    arrays = host_arrays(tensors)
    for array, tensor in zip(arrays, tensors, strict=True):
        np.testing.assert_array_equal(array, tensor.numpy())
    tensors[0][0, 0, 0] = 200  # shared, as tensor.numpy(): no copy was made
    assert arrays[0][0, 0, 0] == 200
    assert host_arrays([]) == []


def test_rmbg_postprocess_leaves_fp32_logits_as_they_were() -> None:
    logits = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    segmentor = object.__new__(RMBG20Segmentor)  # postprocess uses no model state
    mattes = segmentor.postprocess(logits, [(48, 64), (30, 20)])
    assert torch.equal(logits, before)
    assert [m.shape for m in mattes] == [(48, 64), (30, 20)]
    assert all(m.dtype == np.uint8 for m in mattes)


def test_an_arrival_finishes_once_and_answers_each_frame_in_order() -> None:
    """A batch's outputs made from its copy once, whichever frame or thread asks first."""
    tensors = [torch.full((2, 2), value, dtype=torch.uint8) for value in (3, 5, 9)]
    calls: list[int] = []

    def finish(hosts: list[np.ndarray]) -> list[int]:
        calls.append(len(hosts))
        return [int(host.sum()) for host in hosts]

    arrival = Arrival(copy_to_host(tensors), finish, len(tensors))
    frames = arrival.each()
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda frame: frame.result(), reversed(frames)))
    assert got == [36, 20, 12]
    assert calls == [3]
    assert arrival.result() == [12, 20, 36]
    assert Arrival(copy_to_host([]), finish, 0).each() == []


def test_an_arrival_lets_go_of_what_it_made_its_outputs_from() -> None:
    """Once the outputs are made, the tensors ``finish`` held (on a GPU: the outputs still on
    the device) are freed, though the frames' answers still hold the arrival."""
    on_device = torch.arange(6, dtype=torch.uint8)
    held = weakref.ref(on_device)

    def finish(hosts: list[np.ndarray], made: torch.Tensor = on_device) -> list[int]:
        return [int(made.sum()) + int(host.sum()) for host in hosts]

    arrival = Arrival(copy_to_host([torch.ones(2, dtype=torch.uint8)]), finish, 1)
    del on_device, finish
    frames = arrival.each()
    assert held() is not None
    assert frames[0].result() == 17
    assert held() is None
    assert frames[0].result() == 17


class _FailedCopy(HostCopy):
    """A copy the device could not make (a fault a CPU cannot cause)."""

    def wait(self) -> list[np.ndarray]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failed_arrival_fails_every_frame_with_its_error_without_trying_again() -> None:
    calls: list[int] = []

    def finish(hosts: list[np.ndarray]) -> list[int]:
        calls.append(len(hosts))
        return [0] * len(hosts)

    frames = Arrival(_FailedCopy([np.zeros(1), np.zeros(1)]), finish, 2).each()
    errors = []
    for frame in frames:
        with pytest.raises(RuntimeError, match="illegal memory access") as caught:
            frame.result()
        errors.append(caught.value)
    assert errors[0] is errors[1] and calls == []
