"""host_arrays on host tensors: each as ``tensor.numpy()``, in order, nothing copied."""

from __future__ import annotations

import numpy as np
import torch

from segmentation.transfer import host_arrays


def test_host_tensors_come_back_in_order_with_their_shapes_dtypes_and_memory() -> None:
    rgba = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    logits = torch.linspace(-1, 1, 6, dtype=torch.float32).reshape(2, 3)
    transposed = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()  # not contiguous
    empty = torch.empty((0, 5), dtype=torch.uint8)
    arrays = host_arrays([rgba, logits, transposed, empty])
    for array, tensor in zip(arrays, [rgba, logits, transposed, empty], strict=True):
        assert array.shape == tuple(tensor.shape)
        assert array.dtype == tensor.numpy().dtype
        np.testing.assert_array_equal(array, tensor.numpy())
    rgba[0, 0, 0] = 200  # shared, as tensor.numpy(): no copy was made
    assert arrays[0][0, 0, 0] == 200


def test_nothing_gives_nothing() -> None:
    assert host_arrays([]) == []
