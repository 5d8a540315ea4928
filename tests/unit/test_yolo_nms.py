"""One NMS call for a whole batch gives Ultralytics' per-image detections, row for row."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ultralytics.utils.nms import non_max_suppression

from segmentation.models import yolo_nms
from segmentation.models.yolo_nms import batched_nms


def predictions(seed: int, batch: int, nc: int, extra: int, anchors: int = 900) -> torch.Tensor:
    """Raw head output ``[batch, 4 + nc + extra, anchors]``: crowded boxes (most overlap
    others), scores mostly under 0.25, the last image with no candidate at all."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand((batch, 2, anchors), generator=gen) * 320
    sizes = 5 + torch.rand((batch, 2, anchors), generator=gen) * 150
    scores = torch.rand((batch, nc, anchors), generator=gen) ** 4
    scores[-1] = 0.1
    coeffs = torch.randn((batch, extra, anchors), generator=gen)
    return torch.cat((centres, sizes, scores, coeffs), 1)


def ultralytics(prediction: torch.Tensor, nc: int, **kwargs: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = non_max_suppression(prediction, nc=nc, max_time_img=10.0, **kwargs)
    return found


@pytest.mark.parametrize(
    ("nc", "extra", "classes", "max_det", "iou"),
    [
        (1, 32, None, 300, 0.7),  # the product stand-in's shape
        (3, 32, None, 300, 0.45),
        (5, 0, [1, 3], 300, 0.7),
        (80, 32, None, 4, 0.7),  # COCO's classes, and fewer detections kept than found
    ],
)
def test_the_batch_keeps_the_rows_ultralytics_keeps_image_by_image(
    nc: int, extra: int, classes: list[int] | None, max_det: int, iou: float
) -> None:
    for seed in range(4):
        prediction = predictions(seed, 6, nc, extra)
        got = batched_nms(prediction, 0.25, iou, classes, max_det, nc)
        expected = ultralytics(
            prediction, nc, conf_thres=0.25, iou_thres=iou, classes=classes, max_det=max_det
        )
        assert got is not None and len(got) == len(expected) == 6
        for mine, theirs in zip(got, expected, strict=True):
            assert mine.shape == theirs.shape
            assert torch.equal(mine, theirs)
        assert sum(len(rows) for rows in got[:-1]) > 5 * min(max_det, 3)
        assert got[-1].shape == (0, 6 + extra)
        if classes is not None:
            assert set(torch.cat(got)[:, 5].tolist()) <= {float(c) for c in classes}


def test_equal_scores_keep_the_anchor_order_ultralytics_keeps() -> None:
    prediction = predictions(7, 3, 2, 4)
    prediction[:, 4:6] = torch.where(prediction[:, 4:6] > 0.25, 0.5, 0.0)  # every score ties
    got = batched_nms(prediction, 0.25, 0.7, None, 300, 2)
    expected = ultralytics(prediction, 2, conf_thres=0.25, iou_thres=0.7)
    assert got is not None
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(got[0]) > 10


def test_a_batch_with_no_candidate_gives_empty_rows_per_image() -> None:
    prediction = predictions(1, 4, 3, 32)
    prediction[:, 4:7] = 0.0
    got = batched_nms(prediction, 0.25, 0.7, None, 300, 3)
    assert got is not None and [rows.shape for rows in got] == [(0, 38)] * 4


def test_an_image_with_more_candidates_than_ultralytics_takes_is_left_to_its_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ultralytics keeps the best MAX_NMS of such an image by an unstable sort: not
    reproduced, so the caller is told to run Ultralytics' path."""
    prediction = predictions(2, 2, 1, 0)
    monkeypatch.setattr(yolo_nms, "MAX_NMS", 20)
    assert batched_nms(prediction, 0.25, 0.7, None, 300, 1) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_box_that_is_not_finite_is_left_to_ultralytics_path(bad: float) -> None:
    """An FP16 overflow can give such a box: no region holds it, so the caller is told to run
    Ultralytics' path (which then answers as it always did)."""
    prediction = predictions(3, 2, 1, 0)
    prediction[0, 2, int(prediction[0, 4].argmax())] = bad
    assert batched_nms(prediction, 0.25, 0.7, None, 300, 1) is None


def test_images_are_suppressed_in_runs_of_bounded_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At conf 0 every anchor is a candidate (8,400 an image at 640): one nms call for a batch
    of 64 would need an N x N mask of 36 GB on a GPU. Runs of images under MAX_CANDIDATES
    give the same rows; an image over it is a run of its own."""
    prediction = predictions(5, 6, 3, 4, anchors=300)
    expected = ultralytics(prediction, 3, conf_thres=0.0, iou_thres=0.6)
    monkeypatch.setattr(yolo_nms, "MAX_CANDIDATES", 700)  # two images a run
    got = batched_nms(prediction, 0.0, 0.6, None, 300, 3)
    assert got is not None
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert yolo_nms._candidate_runs([300, 300, 300, 300, 300, 300]) == [
        (0, 600),
        (600, 1200),
        (1200, 1800),
    ]
    assert yolo_nms._candidate_runs([100, 200, 0, 150, 800, 100]) == [
        (0, 450),
        (450, 1250),
        (1250, 1350),
    ]


def test_a_class_filter_with_repeated_ids_keeps_what_ultralytics_keeps() -> None:
    prediction = predictions(6, 3, 5, 8)
    expected = ultralytics(prediction, 5, conf_thres=0.25, iou_thres=0.7, classes=[2, 4])
    got = batched_nms(prediction, 0.25, 0.7, [4, 2, 2, 4, 4], 300, 5)
    assert got is not None
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_boxes_too_far_apart_for_exact_offsets_are_left_to_ultralytics_path() -> None:
    """A box a trillion pixels wide (finite, but no head of a real model gives one) would need
    offsets past 2**40, where float64 no longer holds each image's coordinates exactly."""
    prediction = predictions(4, 2, 1, 0)
    prediction[0, 2, int(prediction[0, 4].argmax())] = 1e12
    assert batched_nms(prediction, 0.25, 0.7, None, 300, 1) is None
