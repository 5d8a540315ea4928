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


def _segment_dataset(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "segmentation_pipelines.segment_dataset", *args]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_two_inputs_that_would_write_one_file_are_refused_before_ray_starts(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in"
    (source / "clip").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "clip/frame_000000.png", "b.png"):
        Image.fromarray(product_frame(32, 24)).save(source / name)
    write_video(source / "clip.mp4", [product_frame(32, 24, seed=i) for i in range(3)], fps=5)
    out = tmp_path / "out"
    done = _segment_dataset(str(source), str(out), "--address", "local", "--num-cpus", "1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"a.jpg and a.png would both write {out}/a.png" in done.stderr
    assert (
        f"clip.mp4 and clip/frame_000000.png would both write {out}/clip/frame_000000.png"
        in done.stderr
    )
    assert "b.png" not in done.stderr  # only the pairs that clash
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr
    assert not out.exists()  # nothing was written, no model was built


def test_an_output_that_cannot_be_written_is_refused_before_ray_starts(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(product_frame(32, 24)).save(source / "a.png")
    a_file = tmp_path / "cutouts"
    a_file.write_text("a file, not a directory")
    for output, reason in (
        (a_file, "is a file, not a directory"),
        (a_file / "sub", "Not a directory"),
        (Path("/proc/segment-dataset-test"), "No such file or directory"),
    ):
        done = _segment_dataset(str(source), str(output), "--address", "local")
        assert done.returncode == 2, done.stderr[-3000:]
        assert "cannot write the output" in done.stderr and reason in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # one line: Ray never started


def test_inputs_clash_only_where_their_outputs_would_be_one_file() -> None:
    from segmentation_pipelines.segment_dataset import find_collisions

    rows = [
        {"name": "a.png", "kind": "image"},
        {"name": "a.jpg", "kind": "image"},
        {"name": "shots/clip.mov", "kind": "video"},
        {"name": "shots/clip.mp4", "kind": "video"},
        {"name": "shots/clip/frame_000012.png", "kind": "image"},
        {"name": "shots/clip/other.png", "kind": "image"},
        {"name": "x.png", "kind": "image"},
        {"name": "x.png.mp4", "kind": "video"},
    ]
    assert find_collisions(rows) == [
        ("a.png", "a.jpg", "a.png"),
        ("shots/clip.mov", "shots/clip.mp4", "shots/clip/"),
        ("shots/clip.mov", "shots/clip/frame_000012.png", "shots/clip/frame_000012.png"),
        ("x.png", "x.png.mp4", "x.png"),
    ]
    assert find_collisions([r for r in rows if r["name"] in ("a.png", "x.png.mp4")]) == []


def test_load_frames_turns_a_rotated_clip_upright(tmp_path: Path) -> None:
    """The display matrix of a phone clip is applied before the segmentor sees a frame."""
    import av

    from segmentation_pipelines.segment_dataset import load_frames

    upright = product_frame(24, 40, seed=3)
    clip = tmp_path / "portrait.mov"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = 40, 24, "rgb24"
        stream.set_display_rotation(-90)  # stored landscape; shown turned clockwise
        for _ in range(2):
            stored = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(upright, 1)))
            container.mux(stream.encode(stored))
        container.mux(stream.encode(None))
    item = {"uri": str(tmp_path), "path": str(clip), "name": "portrait.mov", "kind": "video"}
    rows = list(load_frames(item))
    assert [row["frame"] for row in rows] == [0, 1]
    assert all(np.array_equal(row["image"], upright) and not row["error"] for row in rows)
