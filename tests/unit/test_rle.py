"""The device-side RLE encoder gives exactly the COCO strings of the host encoder."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segmentation.rle import encode_rle_batch
from segmentation_client.wire import decode_rle, encode_rle


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12)),
        elements=st.integers(0, 1),
    )
)
def test_matches_the_host_encoder_on_any_masks(masks: np.ndarray) -> None:
    assert encode_rle_batch(torch.from_numpy(masks)) == [encode_rle(m) for m in masks]


def test_frame_sized_masks_round_trip_edges_included() -> None:
    masks = np.zeros((4, 1080, 1920), dtype=np.uint8)
    masks[0, 200:700, 300:900] = 1  # a product
    masks[1] = 1  # everything: one run that starts at the first pixel
    masks[2, 0, 0] = masks[2, -1, -1] = 1  # the first and the last pixel alone
    encoded = encode_rle_batch(torch.from_numpy(masks).bool())
    assert encoded == [encode_rle(m) for m in masks]
    for mask, rle in zip(masks, encoded, strict=True):
        assert rle["size"] == [1080, 1920]
        np.testing.assert_array_equal(decode_rle(rle), mask)


def test_no_masks_no_strings() -> None:
    assert encode_rle_batch(torch.zeros((0, 1080, 1920), dtype=torch.bool)) == []
