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


def test_masks_with_runs_of_every_length_in_one_call() -> None:
    """Runs of one pixel to whole columns, in many masks at once: counts of one to seven
    characters, differences of either sign (each mask's strings alone as pycocotools' own)."""
    rng = np.random.default_rng(11)
    masks = np.zeros((8, 541, 963), dtype=np.uint8)
    for mask in masks:
        for _ in range(int(rng.integers(1, 6))):
            top, left = rng.integers(0, 500), rng.integers(0, 900)
            mask[top : top + rng.integers(1, 541), left : left + rng.integers(1, 963)] = 1
        mask[rng.random(mask.shape) < rng.choice([0.0, 0.001, 0.3])] ^= 1
    masks[5] = 0
    masks[6] = 1
    assert encode_rle_batch(torch.from_numpy(masks)) == [encode_rle(m) for m in masks]
