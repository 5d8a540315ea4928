"""RLE on the GPU (the YOLO replica's mask path) gives the host encoder's strings."""

from __future__ import annotations

import numpy as np
import torch

from segmentation.rle import encode_rle_batch
from segmentation_client.wire import encode_rle


def test_device_rle_of_frame_sized_masks_equals_the_host_encoder() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 1080, 1920), dtype=np.uint8)
    for index in range(5):
        top, left = rng.integers(0, 800), rng.integers(0, 1500)
        masks[index, top : top + 250, left : left + 400] = 1
    masks[4] ^= rng.integers(0, 2, (1080, 1920), dtype=np.uint8)  # ragged edges everywhere
    masks[5, 0, :] = 1  # runs that start at the first pixel
    on_gpu = torch.from_numpy(masks).cuda().bool()
    assert encode_rle_batch(on_gpu) == [encode_rle(m) for m in masks]
