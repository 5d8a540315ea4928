"""segment-dataset on a local Ray (CPU, stand-in models): every frame of every file written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from tests.conftest import REPO_ROOT, assert_cutout, product_frame, write_video

pytestmark = pytest.mark.integration


def test_dataset_of_images_and_videos(tmp_path: Path, standin_cache: Path) -> None:
    source = tmp_path / "in"
    (source / "shoots" / "day1").mkdir(parents=True)
    stills = {"a.png": product_frame(80, 60, seed=1), "shoots/b.png": product_frame(50, 70, seed=2)}
    for name, frame in stills.items():
        Image.fromarray(frame).save(source / name)
    clip = write_video(
        source / "shoots" / "day1" / "clip.mov",
        [product_frame(64, 48, seed=10 + i) for i in range(7)],
        fps=10,
    )
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (source / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    env = {**os.environ, "PRODUCT_SEGMENTOR_CACHE": str(standin_cache), "RAY_ADDRESS": ""}
    command = [
        sys.executable,
        "-m",
        "segmentation_pipelines.segment_dataset",
        str(source),
        str(out),
        "--model",
        "yolo",
        "--model-path",
        standins.YOLO_STANDIN,
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--address",
        "local",
        "--num-cpus",
        "2",
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    # One unreadable file: reported, the exit status says so, everything else is written.
    assert done.returncode == 1, done.stderr[-3000:]
    assert "skipped broken.jpg" in done.stderr
    assert "9 frames written" in done.stderr

    for name, frame in stills.items():
        pixels = np.asarray(Image.open(out / Path(name).with_suffix(".png")))
        assert pixels.shape == (*frame.shape[:2], 4)
        assert_cutout(pixels, frame)
        instances = json.loads((out / Path(name).with_suffix(".json")).read_text())
        assert all(i["mask"]["size"] == list(frame.shape[:2]) for i in instances)
    frames = sorted((out / "shoots" / "day1" / "clip").glob("frame_*.png"))
    assert [p.name for p in frames] == [f"frame_{i:06d}.png" for i in range(7)]
    for png, frame in zip(frames, clip, strict=True):
        assert_cutout(np.asarray(Image.open(png)), frame)
    assert not (out / "notes.png").exists() and not (out / "broken.png").exists()
