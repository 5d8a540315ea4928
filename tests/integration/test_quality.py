"""The demo's trained stand-ins see: on held-out synthetic product shots (seeds the training
never used), their answers through HTTP match the ground truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation_client.segment_video import main as segment_video
from segmentation_client.wire import decode_rle
from segmentation_standins import synthetic
from segmentation_standins.quality import instance_recall, mask_iou, matte_iou
from tests.conftest import encode, write_video
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

HELD_OUT = 2000  # training used seeds 0 (train) and 1 (validation)
FRAMES = 12


@pytest.fixture(scope="module")
def held_out() -> list[synthetic.Scene]:
    sizes = [(320, 240), (400, 300), (360, 360), (480, 270)]
    return [synthetic.scene(HELD_OUT + i, 0, *sizes[i % len(sizes)]) for i in range(FRAMES)]


def test_the_demo_serves_the_trained_stand_ins(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["rmbg-2.0"]["source"] == standins.PRODUCT_RMBG
    assert models["yolo11-seg"]["source"] == standins.PRODUCT_YOLO
    assert all(info["stand_in"] is True for info in models.values())


def test_mattes_match_the_ground_truth(
    client: httpx.Client, held_out: list[synthetic.Scene]
) -> None:
    ious = []
    for scene in held_out:
        response = client.post(
            "/v1/remove-background",
            params={"output": "mask"},
            content=encode(scene.image, "PNG"),
            headers={"Content-Type": "image/png"},
        )
        assert response.status_code == 200, response.text
        matte = np.asarray(Image.open(io.BytesIO(response.content)))
        assert matte.shape == scene.alpha.shape
        ious.append(matte_iou(matte, scene))
    assert min(ious) >= 0.9, np.round(ious, 3)


def test_instances_match_the_ground_truth(
    client: httpx.Client, held_out: list[synthetic.Scene]
) -> None:
    matched = total = spurious = 0
    for scene in held_out:
        response = client.post(
            "/v1/segment",
            content=encode(scene.image, "PNG"),
            headers={"Content-Type": "image/png"},
        )
        assert response.status_code == 200, response.text
        instances = response.json()["instances"]
        for inst in instances:
            assert inst["class_name"] == synthetic.CLASS_NAMES[inst["class_id"]]
        found = [(i["class_id"], decode_rle(i["mask"]).astype(bool)) for i in instances]
        hit, count = instance_recall(found, scene, min_iou=0.8)
        matched, total, spurious = matched + hit, total + count, spurious + len(found) - hit
    assert matched / total >= 0.9, (matched, total)
    assert spurious <= 0.1 * total, (spurious, total)


def test_products_cut_out_one_product_per_object(
    client: httpx.Client, held_out: list[synthetic.Scene]
) -> None:
    right = 0
    for scene in held_out:
        response = client.post(
            "/v1/products",
            content=encode(scene.image, "PNG"),
            headers={"Content-Type": "image/png"},
        )
        assert response.status_code == 200, response.text
        products = response.json()["products"]
        boxes = scene.boxes
        covered = set()
        for product in products:
            x1, y1, x2, y2 = product["box"]
            ious = [_box_iou((x1, y1, x2, y2), tuple(box)) for box in boxes]
            covered.add(int(np.argmax(ious)) if max(ious) >= 0.7 else -1)
        right += len(products) == len(boxes) and covered == set(range(len(boxes)))
    assert right >= 0.9 * len(held_out), (right, len(held_out))


def test_segment_video_mattes_match_the_ground_truth_frame_by_frame(
    cluster: Cluster, tmp_path: Path
) -> None:
    clip = synthetic.clip(HELD_OUT, 8, 256, 192)
    write_video(tmp_path / "clip.mov", [scene.image for scene in clip], fps=25)
    out, report = tmp_path / "seq", tmp_path / "report.json"
    args = ["-o", str(out), "--server", cluster.url, "--no-progress", "--report", str(report)]
    code = segment_video([str(tmp_path / "clip.mov"), *args])
    assert code == 0
    assert json.loads(report.read_text())["frames"] == len(clip)
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == len(clip)
    for png, scene in zip(written, clip, strict=True):
        alpha = np.asarray(Image.open(png))[..., 3]
        assert mask_iou(alpha >= 128, scene.alpha >= 0.5) >= 0.9


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union else 0.0
