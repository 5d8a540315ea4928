"""YoloSegmentor on the CPU with YOLO11n-seg stand-ins (a .pt checkpoint and the .yaml)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import segmentation_standins as standins
from segmentation import precision
from segmentation.encoders import decode_rle
from segmentation.errors import ModelLoadError
from segmentation.models import yolo_segmentor
from segmentation.models.yolo_segmentor import FP16_MESSAGE, YoloSegmentor
from segmentation.options import DetectOptions
from tests.conftest import product_frame


@pytest.fixture(scope="module")
def segmentor() -> YoloSegmentor:
    return YoloSegmentor(standins.YOLO_STANDIN, device="cpu")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "fp16_unsupported_reason", lambda device: None)


def test_instances_at_original_resolution(segmentor: YoloSegmentor) -> None:
    frames = [product_frame(640, 360, 1), product_frame(200, 300, 2)]
    results = segmentor.predict(frames)
    assert [(r.width, r.height) for r in results] == [(640, 360), (200, 300)]
    for result in results:
        assert result.instances, "the stand-in is built to find objects"
        for inst in result.instances:
            x1, y1, x2, y2 = inst.box
            assert 0 <= x1 < x2 <= result.width and 0 <= y1 < y2 <= result.height
            assert 0.25 <= inst.score <= 1.0
            assert inst.class_name == segmentor.names[inst.class_id]
            mask = decode_rle(inst.mask)
            assert mask.shape == (result.height, result.width)
            assert inst.mask["size"] == [result.height, result.width]
            ys, xs = np.nonzero(mask)
            assert len(ys) > 0
            # the mask lies inside its box
            assert xs.min() >= int(x1) and xs.max() <= int(np.ceil(x2))
            assert ys.min() >= int(y1) and ys.max() <= int(np.ceil(y2))


def test_thresholds_per_call(segmentor: YoloSegmentor) -> None:
    frame = [product_frame(320, 240)]
    everything = segmentor.predict(frame)[0].instances
    assert len(segmentor.predict(frame, DetectOptions(max_det=2))[0].instances) == 2
    assert segmentor.predict(frame, DetectOptions(conf=0.99))[0].instances == []
    assert segmentor.predict(frame, DetectOptions(classes=(5,)))[0].instances == []
    kept = segmentor.predict(frame, DetectOptions(classes=(0,)))[0].instances
    assert kept and all(i.class_id == 0 for i in kept)
    assert len(everything) >= len(kept)
    assert len(segmentor.predict(frame, DetectOptions(iou=0.1))[0].instances) < len(everything)


def test_a_class_list_from_a_config_groups_frames_like_a_tuple(segmentor: YoloSegmentor) -> None:
    """Options given a list (a config, JSON) stay hashable, repeated ids once: frames of one
    batch are grouped by their options."""
    listed = DetectOptions(classes=[0, 0, 1])  # type: ignore[arg-type]
    assert listed.classes == (0, 1) and listed == DetectOptions(classes=(0, 1))
    frames = [product_frame(320, 200, seed=90 + i) for i in range(2)]
    both = segmentor.predict(frames, [listed, DetectOptions(classes=(0, 1))])
    as_tuple = segmentor.predict(frames, DetectOptions(classes=(0, 1)))
    assert [r.instances for r in both] == [r.instances for r in as_tuple]
    assert all(r.instances for r in both)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"conf": 1.5}, "conf"), ({"iou": -0.1}, "iou"), ({"max_det": 0}, "max_det")],
)
def test_invalid_thresholds_are_rejected(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DetectOptions(**options)


def test_mask_upsampling_stays_inside_the_element_budget(
    segmentor: YoloSegmentor, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = product_frame(1920, 1080)
    reference = segmentor.predict([frame])[0]
    budget = 2 * 1920 * 1080
    monkeypatch.setattr(yolo_segmentor, "MASK_ELEMENT_BUDGET", budget)
    largest: list[int] = []
    real_interpolate = torch.nn.functional.interpolate

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        out = real_interpolate(*args, **kwargs)  # type: ignore[arg-type]
        largest.append(out.numel())
        return out

    monkeypatch.setattr(yolo_segmentor.F, "interpolate", spy)
    bounded = segmentor.predict([frame])[0]
    assert len(reference.instances) > 2  # several chunks were needed
    assert max(largest) <= budget
    assert [i.mask for i in bounded.instances] == [i.mask for i in reference.instances]


def test_loads_from_yaml_with_random_weights() -> None:
    model = YoloSegmentor("yolo11n-seg.yaml", device="cpu")
    result = model.predict([product_frame(160, 120)], DetectOptions(conf=0.0, max_det=3))[0]
    assert len(result.instances) == 3
    assert decode_rle(result.instances[0].mask).shape == (120, 160)


def test_not_converted_on_cpu(segmentor: YoloSegmentor) -> None:
    assert segmentor.precision.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in segmentor.model.parameters())


def test_converted_when_enabled(fake_gpu: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        model = YoloSegmentor(standins.YOLO_STANDIN, device="cpu", use_fp16=True)
    assert FP16_MESSAGE in caplog.messages
    assert model.info().precision == "fp16"
    assert all(p.dtype == torch.float16 for p in model.model.parameters())
    batch, _ = model.preprocess([product_frame(64, 64)])
    assert batch.dtype == torch.float16


def test_not_converted_when_disabled(fake_gpu: None) -> None:
    model = YoloSegmentor(standins.YOLO_STANDIN, device="cpu", use_fp16=False)
    assert model.precision.reason == "FP16 disabled by USE_FP16"
    assert all(p.dtype == torch.float32 for p in model.model.parameters())


def test_conversion_failure_falls_back_gracefully(
    fake_gpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_half = torch.nn.Module.half

    def failing_half(self: torch.nn.Module) -> torch.nn.Module:
        real_half(self)  # half-way through, as a real failure would leave it
        raise RuntimeError("FP16 not supported by this layer")

    monkeypatch.setattr(torch.nn.Module, "half", failing_half)
    with caplog.at_level(logging.WARNING):
        model = YoloSegmentor(standins.YOLO_STANDIN, device="cpu", use_fp16=True)
    assert model.precision.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    assert any("falling back to FP32" in m for m in caplog.messages)
    assert model.predict([product_frame(128, 96)])[0].width == 128


def test_missing_weights_file_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(ModelLoadError, match="YOLO_MODEL"):
        YoloSegmentor(f"{tmp_path}/missing-seg.pt", device="cpu")


def test_detection_only_checkpoint_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="not a segmentation model"):
        YoloSegmentor("yolo11n.yaml", device="cpu")


def test_device_tensors_give_the_same_detections_as_arrays(segmentor: YoloSegmentor) -> None:
    frame = product_frame(320, 200, seed=5)
    from_array = segmentor.predict([frame])[0]
    from_tensor = segmentor.predict([torch.from_numpy(frame).permute(2, 0, 1).contiguous()])[0]
    assert (from_tensor.width, from_tensor.height) == (320, 200)
    assert [i.box for i in from_tensor.instances] == [i.box for i in from_array.instances]
    with pytest.raises(ValueError, match="3xHxW"):
        segmentor.predict([torch.zeros(200, 320, 3, dtype=torch.uint8)])


def test_a_batch_answers_each_frame_as_if_it_were_alone(
    segmentor: YoloSegmentor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames letterboxed in groups, NMS once per set of thresholds: same answers per frame,
    with per-frame thresholds kept, across a preprocessing chunk boundary."""
    monkeypatch.setattr(yolo_segmentor, "PREPROCESS_ELEMENT_BUDGET", 3 * 200 * 320 * 3)
    frames = [product_frame(320, 200, seed=60 + i) for i in range(7)]
    options = [DetectOptions(max_det=1) if i % 3 == 1 else DetectOptions() for i in range(7)]
    batched = segmentor.predict(frames, options)
    for frame, opts, got in zip(frames, options, batched, strict=True):
        alone = segmentor.predict([frame], opts)[0]
        assert (got.width, got.height) == (320, 200)
        assert len(got.instances) == len(alone.instances) > 0
        if opts.max_det == 1:
            assert len(got.instances) == 1
        assert sorted(i.score for i in got.instances) == pytest.approx(
            sorted(i.score for i in alone.instances), abs=1e-4
        )


def test_padding_to_a_bucket_changes_no_answer(segmentor: YoloSegmentor) -> None:
    frames = [product_frame(320, 200, seed=80 + i) for i in range(3)]
    plain = segmentor.predict(frames)
    segmentor.batch_buckets = (1, 2, 8)
    try:
        padded = segmentor.predict(frames)  # runs as a batch of 8
    finally:
        segmentor.batch_buckets = None
    for a, b in zip(plain, padded, strict=True):
        assert sorted(i.score for i in a.instances) == pytest.approx(
            sorted(i.score for i in b.instances), abs=1e-4
        )


@pytest.mark.parametrize(("threads", "budget"), [(None, None), (1, None), (None, 3 * 6400)])
def test_the_batch_postprocess_gives_the_frame_by_frame_instances_and_strings(
    threads: int | None, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One NMS call and one mask pass for the batch (frames grouped by letterbox) against
    Ultralytics' NMS and each frame on its own: the same instances, boxes, scores, classes
    and RLE strings, with per-frame thresholds, two frame sizes and a frame with nothing in
    it; also on one thread, where the mask kernels depend on a frame's own chunks, and with
    a mask budget of a few instances' logits (the batch taken in runs of frames)."""
    if budget:
        monkeypatch.setattr(yolo_segmentor, "MASK_ELEMENT_BUDGET", budget)
    from segmentation_standins import synthetic

    segmentor = YoloSegmentor(standins.PRODUCT_YOLO, device="cpu")
    sizes = [(1280, 720)] * 4 + [(643, 481)] * 2
    frames = [synthetic.scene(700 + i, 0, w, h).image for i, (w, h) in enumerate(sizes)]
    frames.append(np.full((720, 1280, 3), 255, dtype=np.uint8))  # a blank frame
    options = [DetectOptions()] * len(frames)
    options[1] = DetectOptions(max_det=1)
    options[4] = DetectOptions(conf=0.6)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            batch, boxes = segmentor.preprocess(frames)
            preds, protos = segmentor.forward(batch)
            got = segmentor.postprocess(preds, protos, boxes, options)
            expected = segmentor.postprocess_frame_by_frame(preds, protos, boxes, options)
    finally:
        torch.set_num_threads(saved)
    assert [len(r.instances) for r in got] == [len(r.instances) for r in expected]
    assert len(got[1].instances) == 1 and not got[-1].instances
    assert sum(len(r.instances) for r in got) >= len(frames)
    for mine, theirs in zip(got, expected, strict=True):
        assert (mine.width, mine.height) == (theirs.width, theirs.height)
        assert mine.instances == theirs.instances  # exact boxes and scores, the same strings


@pytest.mark.parametrize(("height", "width"), [(61, 57), (97, 143), (517, 333)])
def test_frames_that_share_a_mask_pass_get_each_frames_own_strings(height: int, width: int) -> None:
    """Random coefficients and prototypes of four frames (15 instances each, boxes of every
    awkward kind): masks made for the four together equal each frame's alone, small frames
    (the full-frame path, whose CPU kernel rounds by how many instances it upsamples at
    once) included."""
    from tests.unit.test_yolo_masks import random_case, rect_input

    segmentor = YoloSegmentor(standins.YOLO_STANDIN, device="cpu")
    cases = [random_case(seed, height, width, rect_input(height, width)) for seed in range(4)]
    lb = cases[0][3]
    protos = torch.stack([proto for _, proto, _, _ in cases])
    dets = []
    for coeffs, _, xyxy, _ in cases:
        boxed = xyxy.clone()  # frame pixels back into the letterboxed input
        boxed[:, [0, 2]] = boxed[:, [0, 2]] * lb.scale + lb.pad_left
        boxed[:, [1, 3]] = boxed[:, [1, 3]] * lb.scale + lb.pad_top
        scores_classes = torch.tensor([[0.5, 0.0]]).expand(len(coeffs), 2)
        dets.append(torch.cat((boxed, scores_classes, coeffs), 1))
    together = segmentor._letterbox_results(dets, protos, [0, 1, 2, 3], lb)
    for index, det in enumerate(dets):
        alone = segmentor._letterbox_results([det], protos[index][None], [0], lb)[0]
        assert together[index] == alone
    assert sum(len(found.instances) for found in together) == 60
