"""On CUDA, YOLO masks sampled inside their boxes give the full-frame path's COCO strings: the
box path reproduces the CUDA bilinear kernel's arithmetic (fused multiply-adds) bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import segmentation_standins as standins
from segmentation.models import yolo_segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.rle import encode_boxed_rle
from segmentation_standins import synthetic
from tests.unit.test_yolo_masks import (
    FRAMES,
    full_mask_rle,
    random_case,
    reference_masks,
    whole_masks,
    zero_padding,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def boxes_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """The box path even where one full-frame chunk would be cheaper on a GPU."""
    monkeypatch.setattr(yolo_segmentor, "_full_frame_is_cheaper", lambda *args: False)


def box_masks(*case: Any) -> list[dict[str, Any]]:
    return YoloSegmentor._masks(None, *case)  # type: ignore[arg-type]


@pytest.mark.parametrize(("height", "width", "input_h", "input_w"), FRAMES)
def test_box_masks_equal_the_full_frame_masks_on_random_logits_on_cuda(
    boxes_always: None, height: int, width: int, input_h: int, input_w: int
) -> None:
    for seed in range(3):
        case = random_case(seed, height, width, (input_h, input_w), device="cuda")
        assert box_masks(*case) == reference_masks(*case)
    assert yolo_segmentor._recipe(torch.device("cuda"), yolo_segmentor._SEPARABLE) is not None


def test_a_frame_with_more_instances_than_one_full_frame_chunk_takes_boxes_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = random_case(6, 1080, 1920, (384, 640), device="cuda")
    monkeypatch.setattr(yolo_segmentor, "MASK_ELEMENT_BUDGET", 4 * 1080 * 1920)
    sampled: list[int] = []
    real_sample = yolo_segmentor._sample_boxes

    def spy(*args: Any) -> torch.Tensor:
        sampled.append(len(args[1]))
        return real_sample(*args)

    monkeypatch.setattr(yolo_segmentor, "_sample_boxes", spy)
    assert box_masks(*case) == reference_masks(*case)
    assert sum(sampled) == len(case[0]) > 4


def test_masks_in_several_chunks_on_cuda_equal_the_full_frame_masks(
    boxes_always: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = random_case(5, 1080, 1920, (384, 640), device="cuda")
    expected = reference_masks(*case)
    monkeypatch.setattr(yolo_segmentor, "MASK_ELEMENT_BUDGET", 200_000)
    assert box_masks(*case) == expected


@pytest.mark.parametrize("always_boxes", [True, False])
def test_the_trained_stand_in_on_cuda_gives_the_same_instances_and_strings(
    monkeypatch: pytest.MonkeyPatch, always_boxes: bool
) -> None:
    if always_boxes:
        monkeypatch.setattr(yolo_segmentor, "_full_frame_is_cheaper", lambda *args: False)
    segmentor = YoloSegmentor(standins.PRODUCT_YOLO, device="cuda")
    sizes = [(1920, 1080), (1080, 1920), (1280, 720), (643, 481)]  # (width, height)
    frames = [synthetic.scene(800 + i, 0, w, h).image for i, (w, h) in enumerate(sizes)]
    frames += [synthetic.scene(900 + i, 0, 1920, 1080).image for i in range(8)]
    boxed = segmentor.predict(frames)
    with monkeypatch.context() as patch:
        patch.setattr(YoloSegmentor, "_masks", lambda self, *args: reference_masks(*args))
        full_frame = segmentor.predict(frames)
    assert sum(len(result.instances) for result in boxed) >= len(frames)
    for got, expected in zip(boxed, full_frame, strict=True):
        assert len(got.instances) == len(expected.instances)
        assert [i.mask for i in got.instances] == [i.mask for i in expected.instances]


def test_boxed_crops_on_cuda_encode_to_pycocotools_strings_of_their_whole_masks() -> None:
    rng = np.random.default_rng(4)
    crops = rng.random((6, 500, 700)) < 0.5
    crops[1] = True
    crops[2] = False
    boxes = np.array(
        [
            [0, 500, 0, 700],
            [0, 1080, 1500, 1920],  # as tall as the frame: runs go on into the next column
            [580, 1080, 1220, 1920],
            [33, 433, 1001, 1601],
            [1080, 1080, 1920, 1920],  # empty, at the far corner
            [700, 1080, 100, 101],
        ]
    )
    crops = np.pad(crops, ((0, 0), (0, 1080 - 500), (0, 0)))
    crops[1] = True
    crops = zero_padding(crops, boxes)
    expected = [full_mask_rle(m) for m in whole_masks(crops, boxes, 1080, 1920)]
    assert encode_boxed_rle(torch.from_numpy(crops).cuda(), boxes, 1080, 1920) == expected


@pytest.mark.parametrize("count", [3, 24])
def test_the_batch_postprocess_gives_the_frame_by_frame_instances_and_strings_on_cuda(
    count: int,
) -> None:
    """The trained stand-in at batch ``count`` of 720p product shots (four scenes, repeated,
    and a blank frame): one NMS call and one mask pass for the batch (full-frame chunks for
    3 frames, box crops for 24) against Ultralytics' NMS and each frame on its own."""
    from segmentation.options import DetectOptions

    segmentor = YoloSegmentor(standins.PRODUCT_YOLO, device="cuda", imgsz=320)
    scenes = [synthetic.scene(800 + i, 0, 1280, 720).image for i in range(min(4, count - 1))]
    frames = [scenes[i % len(scenes)] for i in range(count - 1)]
    frames.append(np.full((720, 1280, 3), 255, dtype=np.uint8))
    options = [DetectOptions()] * count
    with torch.inference_mode():
        batch, boxes = segmentor.preprocess(frames)
        preds, protos = segmentor.forward(batch)
        got = segmentor.postprocess(preds, protos, boxes, options)
        expected = segmentor.postprocess_frame_by_frame(preds, protos, boxes, options)
    assert sum(len(r.instances) for r in got) >= count - 1
    assert not got[-1].instances
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.instances == theirs.instances
