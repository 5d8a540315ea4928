"""YOLO instance masks sampled inside their boxes give the full-frame path's COCO strings.

``reference_masks`` is the full-frame computation as ``YoloSegmentor._masks`` did it before the
masks were sampled box by box (each chunk of instances upsampled by ``F.interpolate`` to the
whole frame, cut to its box, encoded): kept here, so the box path keeps being compared with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import segmentation_standins as standins
from benchmarks.rle_strings import pycocotools_strings
from segmentation.encoders import encode_rle
from segmentation.models import yolo_segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor, _Letterbox
from segmentation.rle import coco_strings, encode_boxed_rle, encode_rle_batch
from segmentation_standins import synthetic


def reference_masks(
    coeffs: torch.Tensor, proto: torch.Tensor, xyxy: torch.Tensor, lb: _Letterbox
) -> list[dict[str, Any]]:
    """COCO RLE masks at frame size, upsampling a bounded chunk of instances at a time."""
    logits = yolo_segmentor._mask_logits(coeffs, proto, lb)
    chunk = max(1, yolo_segmentor.MASK_ELEMENT_BUDGET // (lb.height * lb.width))
    rows = torch.arange(lb.height, device=proto.device).view(1, -1, 1)
    cols = torch.arange(lb.width, device=proto.device).view(1, 1, -1)
    encoded: list[dict[str, Any]] = []
    for start in range(0, logits.shape[0], chunk):
        part = F.interpolate(
            logits[None, start : start + chunk],
            size=(lb.height, lb.width),
            mode="bilinear",
            align_corners=False,
        )[0]
        box = xyxy[start : start + chunk, :, None, None]
        inside = (cols >= box[:, 0]) & (cols < box[:, 2]) & (rows >= box[:, 1]) & (rows < box[:, 3])
        binary = (part > 0) & inside
        if binary.device.type == "cuda":
            encoded.extend(encode_rle_batch(binary))
        else:
            encoded.extend(encode_rle(mask) for mask in binary.to(torch.uint8).numpy())
    return encoded


def letterbox(height: int, width: int, input_h: int, input_w: int) -> _Letterbox:
    """The letterbox ``YoloSegmentor.preprocess`` gives a frame in an input of that size."""
    scale = min(input_h / height, input_w / width)
    new_h, new_w = max(round(height * scale), 1), max(round(width * scale), 1)
    return _Letterbox(scale, (input_w - new_w) // 2, (input_h - new_h) // 2, height, width, input_h)


def rect_input(height: int, width: int, imgsz: int = 640, stride: int = 32) -> tuple[int, int]:
    """The input of a batch of same-size frames: the smallest stride-aligned rectangle."""
    scale = min(imgsz / height, imgsz / width)
    new_h, new_w = max(round(height * scale), 1), max(round(width * scale), 1)
    return math.ceil(new_h / stride) * stride, math.ceil(new_w / stride) * stride


def random_case(
    seed: int, height: int, width: int, input_size: tuple[int, int], device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Letterbox]:
    """Random coefficients and prototypes, and boxes of every awkward kind, for one frame."""
    generator = torch.Generator().manual_seed(seed)
    input_h, input_w = input_size
    proto = torch.randn((32, input_h // 4, input_w // 4), generator=generator)
    w, h = float(width), float(height)
    corners = torch.rand((6, 4), generator=generator) * torch.tensor([w, h, w, h])
    fractional = torch.cat(
        (
            torch.minimum(corners[:, :2], corners[:, 2:]),
            torch.maximum(corners[:, :2], corners[:, 2:]),
        ),
        dim=1,
    )
    awkward = torch.tensor(
        [
            [0, 0, w, h],  # the whole frame: runs go on from one column into the next
            [w * 0.6, h * 0.3, w, h],  # touches the right and bottom edges
            [0, 0, w * 0.25 + 0.5, h * 0.4 + 0.25],  # touches the top and left edges
            [w * 0.4 + 0.3, 0, w * 0.4 + 4.1, h],  # a few columns, top to bottom
            [w * 0.5, h * 0.5, w * 0.5, h * 0.9],  # no width
            [w * 0.1, h * 0.7, w * 0.8, h * 0.7],  # no height
            [w, h, w, h],  # nothing, at the far corner
            [10.2, 3.2, 10.9, 3.9],  # inside one pixel: covers none
            [10.0, 3.0, 10.5, 3.5],  # covers exactly one pixel
        ]
    )
    xyxy = torch.cat((fractional, awkward))
    coeffs = torch.randn((len(xyxy), 32), generator=generator) * 0.5
    return (
        coeffs.to(device),
        proto.to(device),
        xyxy.to(device),
        letterbox(height, width, input_h, input_w),
    )


#: (height, width, input height, input width): landscape and portrait letterboxes, odd sizes,
#: square inputs padded on both sides, and frames smaller than the prototypes' content.
FRAMES = [
    (1080, 1920, *rect_input(1080, 1920)),
    (1920, 1080, *rect_input(1920, 1080)),
    (517, 333, *rect_input(517, 333)),
    (333, 517, *rect_input(333, 517)),
    (1001, 999, 640, 640),
    (481, 643, 640, 640),
    (97, 143, 640, 640),
    (61, 57, *rect_input(61, 57)),  # small enough for the full-frame path
]


@pytest.fixture
def segmentor_masks() -> Any:
    """``YoloSegmentor._masks`` as a plain function (it uses nothing of the instance)."""
    return lambda *args: YoloSegmentor._masks(None, *args)  # type: ignore[arg-type]


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("height", "width", "input_h", "input_w"), FRAMES)
def test_box_masks_equal_the_full_frame_masks_on_random_logits(
    segmentor_masks: Any, height: int, width: int, input_h: int, input_w: int
) -> None:
    for seed in range(2):
        case = random_case(seed, height, width, (input_h, input_w))
        expected = reference_masks(*case)
        assert segmentor_masks(*case) == expected
        assert any(len(rle["counts"]) > 4 for rle in expected)  # masks with something in them


def test_a_torch_on_one_thread_gets_its_channels_last_rounding_where_the_full_frame_path_met_it(
    segmentor_masks: Any, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's CPU code upsamples exactly three channels on one thread with another kernel:
    a full-frame chunk of three instances went there, other chunks did not."""
    coeffs, proto, xyxy, lb = random_case(7, 1080, 1920, rect_input(1080, 1920))
    assert segmentor_masks(coeffs[:3], proto, xyxy[:3], lb) == reference_masks(
        coeffs[:3], proto, xyxy[:3], lb
    )
    monkeypatch.setattr(yolo_segmentor, "MASK_ELEMENT_BUDGET", 4 * 1080 * 1920)
    seven = (coeffs[:7], proto, xyxy[:7], lb)  # full-frame chunks of four and of three
    assert segmentor_masks(*seven) == reference_masks(*seven)


def test_masks_are_sampled_a_bounded_number_of_box_pixels_at_a_time(
    segmentor_masks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = random_case(3, 1080, 1920, rect_input(1080, 1920))
    expected = segmentor_masks(*case)
    budget = 300_000
    monkeypatch.setattr(yolo_segmentor, "MASK_ELEMENT_BUDGET", budget)
    sampled: list[tuple[int, int]] = []
    real_sample = yolo_segmentor._sample_boxes

    def spy(*args: Any) -> torch.Tensor:
        values = real_sample(*args)
        sampled.append((values.numel(), len(args[1])))
        return values

    monkeypatch.setattr(yolo_segmentor, "_sample_boxes", spy)
    assert segmentor_masks(*case) == expected
    assert len(sampled) > 2
    assert all(pixels <= budget or instances == 1 for pixels, instances in sampled)
    assert sum(instances for _, instances in sampled) == len(expected)


@pytest.mark.parametrize(
    ("kernel", "size", "channels"),
    [(yolo_segmentor._SEPARABLE, (301, 467), 2), (yolo_segmentor._FOUR_WEIGHTS, (61, 67), 3)],
)
def test_each_fused_recipe_reproduces_pytorchs_kernel_bit_for_bit_on_this_cpu(
    kernel: str, size: tuple[int, int], channels: int
) -> None:
    """The probe takes the first recipe that matches; the float64 one stands in where
    ``addcmul`` rounds twice, so it must match too (on CPUs with fused multiply-adds)."""
    source = torch.randn((channels, 41, 29), generator=torch.Generator().manual_seed(1)) * 3
    expected = F.interpolate(source[None], size=size, mode="bilinear", align_corners=False)[0]
    rows = yolo_segmentor._axis(41, size[0], True)
    cols = yolo_segmentor._axis(29, size[1], True)
    whole = np.array([[0, size[0], 0, size[1]]] * channels)
    for addcmul in (True, False):
        recipe = yolo_segmentor._Recipe(kernel, fused=True, addcmul=addcmul)
        values = yolo_segmentor._sample_boxes(
            source, np.arange(channels), whole, rows, cols, recipe
        )
        assert torch.equal(values, expected)


def test_where_no_recipe_reproduces_the_kernel_the_full_frame_path_answers(
    segmentor_masks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = random_case(4, 333, 517, rect_input(333, 517))
    monkeypatch.setattr(yolo_segmentor, "_RECIPES", {("cpu", yolo_segmentor._SEPARABLE): None})
    full_frame = []
    real_frame_masks = yolo_segmentor._frame_masks

    def spy(*args: Any) -> list[dict[str, Any]]:
        full_frame.append(args)
        return real_frame_masks(*args)

    monkeypatch.setattr(yolo_segmentor, "_frame_masks", spy)
    assert segmentor_masks(*case) == reference_masks(*case)
    assert len(full_frame) == 1


def test_the_trained_stand_in_gives_the_same_instances_and_strings_as_the_full_frame_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    segmentor = YoloSegmentor(standins.PRODUCT_YOLO, device="cpu")
    sizes = [(1920, 1080), (720, 1280), (643, 481)]  # (width, height)
    frames = [synthetic.scene(500 + i, 0, w, h).image for i, (w, h) in enumerate(sizes)]
    frames.append(synthetic.scene(600, 0, 640, 480).image)
    boxed = segmentor.predict(frames)
    with monkeypatch.context() as patch:
        patch.setattr(YoloSegmentor, "_masks", lambda self, *args: reference_masks(*args))
        full_frame = segmentor.predict(frames)
    assert sum(len(result.instances) for result in boxed) >= len(frames)
    for got, expected in zip(boxed, full_frame, strict=True):
        assert len(got.instances) == len(expected.instances)
        assert [i.mask for i in got.instances] == [i.mask for i in expected.instances]


def random_boxed_crops(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Crops (padded past their boxes or not) of boxes anywhere in a small frame, empty boxes
    and boxes as tall or as wide as the frame included."""
    height, width = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    count = int(rng.integers(1, 5))
    rows = np.sort(rng.integers(0, height + 1, (count, 2)), axis=1)
    cols = np.sort(rng.integers(0, width + 1, (count, 2)), axis=1)
    boxes = np.concatenate((rows, cols), axis=1)
    padding = int(rng.integers(0, 3))
    shape = (
        count,
        int(np.ptp(rows, axis=1).max()) + padding,
        int(np.ptp(cols, axis=1).max()) + padding,
    )
    crops = rng.random(shape) < rng.choice([0.1, 0.5, 0.9])
    return zero_padding(crops, boxes), boxes, height, width


def zero_padding(crops: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The crops with zeros past their boxes, as ``encode_boxed_rle`` takes them."""
    rows = np.arange(crops.shape[1]) < (boxes[:, 1] - boxes[:, 0])[:, None]
    cols = np.arange(crops.shape[2]) < (boxes[:, 3] - boxes[:, 2])[:, None]
    return crops & rows[:, :, None] & cols[:, None, :]


def whole_masks(crops: np.ndarray, boxes: np.ndarray, height: int, width: int) -> list[np.ndarray]:
    masks = []
    for crop, (top, bottom, left, right) in zip(crops, boxes, strict=True):
        mask = np.zeros((height, width), dtype=bool)
        mask[top:bottom, left:right] = crop[: bottom - top, : right - left]
        masks.append(mask)
    return masks


def full_mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """pycocotools' own string of a whole mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def test_boxed_crops_encode_to_pycocotools_strings_of_their_whole_masks() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(1000):
        crops, boxes, height, width = random_boxed_crops(rng)
        expected = [full_mask_rle(m) for m in whole_masks(crops, boxes, height, width)]
        assert encode_boxed_rle(torch.from_numpy(crops), boxes, height, width) == expected


def test_boxed_crops_of_a_1080p_frame_encode_like_their_whole_masks() -> None:
    rng = np.random.default_rng(11)
    crops = rng.random((5, 402, 301)) < 0.5
    crops[1] = False  # empty
    crops[2] = True  # solid
    crops[3] = False
    crops[3, 399, 299] = crops[3, 0, 0] = True  # a box's first and last pixels alone
    boxes = np.array(
        [
            [0, 400, 1620, 1920],  # top right corner
            [680, 1080, 0, 300],  # bottom left corner
            [0, 400, 700, 1000],
            [100, 500, 900, 1200],
            [680, 1080, 1919, 1920],  # the last column, down to the last pixel
        ]
    )
    crops[4] = True
    crops = zero_padding(crops, boxes)
    expected = [full_mask_rle(m) for m in whole_masks(crops, boxes, 1080, 1920)]
    assert encode_boxed_rle(torch.from_numpy(crops), boxes, 1080, 1920) == expected


def test_crops_that_fill_whole_columns_make_runs_that_go_on_into_the_next_column() -> None:
    crops = np.ones((2, 6, 3), dtype=bool)
    crops[1, 5, 1] = False
    boxes = np.array([[0, 6, 2, 5], [0, 6, 4, 7]])
    expected = [full_mask_rle(m) for m in whole_masks(crops, boxes, 6, 7)]
    assert encode_boxed_rle(torch.from_numpy(crops), boxes, 6, 7) == expected
    assert (
        expected[0]["counts"] == full_mask_rle(np.pad(np.ones((6, 3)), ((0, 0), (2, 2))))["counts"]
    )


def test_many_masks_of_a_huge_frame_get_pycocotools_strings_in_one_pass() -> None:
    """Counts up to 4e8 and differences of either sign take up to six characters each (the
    most pycocotools' own buffer holds: past 2**29 it writes beyond it); empty masks, masks
    that start at the first pixel or end with the last, and positions shared by two runs sit
    among the others in one call."""
    rng = np.random.default_rng(7)
    height, width = 20_000, 20_000
    total = height * width
    changes = [
        np.sort(rng.choice(total, size=size, replace=False)) for size in (1, 2, 3, 4, 9, 60, 500)
    ]
    changes += [
        np.array([], dtype=np.int64),  # an empty mask
        np.array([0, total]),  # every pixel
        np.array([0, 5, 17, total]),  # first and last pixels set
        np.array([3, 20_000, 20_000, 40_000]),  # one run over two columns
        np.array([total - 1, total]),  # the last pixel alone
        np.array([2**28, 2**28 + 1]),  # counts of six characters
    ]
    order = rng.permutation(len(changes))
    changes = [changes[i] for i in order]
    mask_ids = np.concatenate([np.full(len(c), i) for i, c in enumerate(changes)])
    positions = np.concatenate(changes)
    strings = coco_strings(mask_ids, positions, len(changes), height, width)
    assert strings == pycocotools_strings(changes, height, width)


def test_boxes_outside_the_frame_are_refused() -> None:
    crop = torch.ones((1, 2, 2), dtype=torch.bool)
    with pytest.raises(ValueError, match="inside the 4x5 frame"):
        encode_boxed_rle(crop, np.array([[3, 5, 0, 2]]), 4, 5)
    with pytest.raises(ValueError, match="inside the 4x5 frame"):
        encode_boxed_rle(crop, np.array([[0, 2, 3, 2]]), 4, 5)
    assert encode_boxed_rle(crop[:0], np.zeros((0, 4)), 4, 5) == []
