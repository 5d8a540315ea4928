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
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

import segmentation_standins as standins
from segmentation.encoders import encode_rle
from segmentation.models import yolo_segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor, _Letterbox
from segmentation.rle import encode_boxed_rle, encode_rle_batch
from segmentation_standins import synthetic


def reference_masks(
    coeffs: torch.Tensor, proto: torch.Tensor, xyxy: torch.Tensor, lb: _Letterbox
) -> list[dict[str, Any]]:
    """COCO RLE masks at frame size, upsampling a bounded chunk of instances at a time."""
    channels, proto_h, proto_w = proto.shape
    ratio = proto_h / lb.input_height
    top = int(lb.pad_top * ratio)
    left = int(lb.pad_left * ratio)
    bottom = min(proto_h, math.ceil((lb.pad_top + lb.height * lb.scale) * ratio))
    right = min(proto_w, math.ceil((lb.pad_left + lb.width * lb.scale) * ratio))
    logits = (coeffs.float() @ proto.view(channels, -1)).view(-1, proto_h, proto_w)
    logits = logits[:, top:bottom, left:right]
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
        (torch.minimum(corners[:, :2], corners[:, 2:]), torch.maximum(corners[:, :2], corners[:, 2:])),
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

    def spy(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values, inside = real_sample(*args)
        sampled.append((values.numel(), len(args[1])))
        return values, inside

    monkeypatch.setattr(yolo_segmentor, "_sample_boxes", spy)
    assert segmentor_masks(*case) == expected
    assert len(sampled) > 2
    assert all(pixels <= budget or instances == 1 for pixels, instances in sampled)
    assert sum(instances for _, instances in sampled) == len(expected)


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


def full_mask_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


@st.composite
def boxed_crops(draw: st.DrawFn) -> tuple[np.ndarray, list[int], list[int], int, int]:
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    count = draw(st.integers(1, 4))
    crop_h, crop_w = draw(st.integers(0, height + 2)), draw(st.integers(0, width + 2))
    crops = draw(
        st.lists(
            st.lists(st.lists(st.booleans(), min_size=crop_w, max_size=crop_w), min_size=crop_h),
            min_size=count,
            max_size=count,
        ).map(lambda c: [rows[:crop_h] for rows in c])
    )
    tops = draw(st.lists(st.integers(0, height), min_size=count, max_size=count))
    lefts = draw(st.lists(st.integers(0, width), min_size=count, max_size=count))
    array = np.array(crops, dtype=bool).reshape(count, crop_h, crop_w)
    return array, tops, lefts, height, width


@settings(max_examples=300, deadline=None)
@given(boxed_crops())
def test_boxed_crops_encode_to_the_strings_of_their_whole_masks(
    case: tuple[np.ndarray, list[int], list[int], int, int],
) -> None:
    crops, tops, lefts, height, width = case
    expected = []
    for crop, top, left in zip(crops, tops, lefts, strict=True):
        whole = np.zeros((height + crops.shape[1], width + crops.shape[2]), dtype=bool)
        whole[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        expected.append(full_mask_rle(whole[:height, :width]))  # what passes the edges is cut
    assert encode_boxed_rle(torch.from_numpy(crops), tops, lefts, height, width) == expected


def test_boxed_crops_of_a_1080p_frame_encode_like_their_whole_masks() -> None:
    rng = np.random.default_rng(11)
    crops = rng.random((4, 400, 300)) < 0.5
    crops[1] = False  # empty
    crops[2] = True  # a solid box
    tops, lefts = [0, 680, 0, 100], [1620, 0, 700, 900]  # touching the edges, cut at them
    crops[3, :, :] = False
    crops[3, 399, 299] = crops[3, 0, 0] = True  # a box's first and last pixels alone
    expected = []
    for crop, top, left in zip(crops, tops, lefts, strict=True):
        whole = np.zeros((1080 + 400, 1920 + 300), dtype=bool)
        whole[top : top + 400, left : left + 300] = crop
        expected.append(full_mask_rle(whole[:1080, :1920]))
    assert encode_boxed_rle(torch.from_numpy(crops), tops, lefts, 1080, 1920) == expected


def test_crops_that_fill_whole_columns_make_runs_that_go_on_into_the_next_column() -> None:
    crops = torch.ones((2, 6, 3), dtype=torch.bool)
    crops[1, 5, 1] = False
    got = encode_boxed_rle(crops, [0, 0], [2, 4], 6, 7)
    for rle, crop, left in zip(got, crops.numpy(), [2, 4], strict=True):
        whole = np.zeros((6, 7), dtype=bool)
        whole[:, left : left + 3] = crop[:, : 7 - left]
        assert rle == full_mask_rle(whole)


def test_crop_origins_outside_the_frame_are_refused() -> None:
    with pytest.raises(ValueError, match="inside the 4x5 frame"):
        encode_boxed_rle(torch.ones((1, 2, 2), dtype=torch.bool), [5], [0], 4, 5)
    assert encode_boxed_rle(torch.ones((0, 2, 2), dtype=torch.bool), [], [], 4, 5) == []
