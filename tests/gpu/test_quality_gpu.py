"""FP16 on the GPU gives the trained stand-ins' FP32 answers on held-out synthetic frames:
mattes within a few levels of 255 and the same instances (classes, boxes, masks)."""

from __future__ import annotations

import numpy as np
import pytest

import segmentation_standins as standins
from segmentation.encoders import decode_rle
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation_standins import synthetic
from segmentation_standins.quality import mask_iou, matte_iou


@pytest.fixture(scope="module")
def scenes() -> list[synthetic.Scene]:
    return [synthetic.scene(3000 + i, 0, 640, 480) for i in range(8)]


def test_fp16_mattes_match_fp32(scenes: list[synthetic.Scene]) -> None:
    frames = [scene.image for scene in scenes]
    fp32 = RMBG20Segmentor(standins.PRODUCT_RMBG, device="cuda", use_fp16=False, input_size=256)
    fp16 = RMBG20Segmentor(standins.PRODUCT_RMBG, device="cuda", use_fp16=True, input_size=256)
    assert fp16.precision.name == "fp16" and fp32.precision.name == "fp32"
    for a, b, scene in zip(fp32.predict(frames), fp16.predict(frames), scenes, strict=True):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 4 and diff.mean() < 0.05, (diff.max(), diff.mean())
        assert matte_iou(b, scene) >= 0.9


def test_fp16_instances_match_fp32(scenes: list[synthetic.Scene]) -> None:
    frames = [scene.image for scene in scenes]
    fp32 = YoloSegmentor(standins.PRODUCT_YOLO, device="cuda", use_fp16=False, imgsz=320)
    fp16 = YoloSegmentor(standins.PRODUCT_YOLO, device="cuda", use_fp16=True, imgsz=320)
    for a, b in zip(fp32.predict(frames), fp16.predict(frames), strict=True):
        assert len(a.instances) == len(b.instances) > 0
        for x, y in zip(
            sorted(a.instances, key=lambda i: i.box),
            sorted(b.instances, key=lambda i: i.box),
            strict=True,
        ):
            assert x.class_id == y.class_id
            assert np.abs(np.subtract(x.box, y.box)).max() <= 2.0
            assert abs(x.score - y.score) <= 0.02
            assert mask_iou(decode_rle(x.mask) > 0, decode_rle(y.mask) > 0) >= 0.98
