"""Video in, RGBA out: readers and writers, and segment-video run in-process on stand-ins."""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation_client.segment_video import main
from segmentation_client.video import AlphaVideoWriter, PngSequenceWriter, VideoError, VideoReader
from tests.conftest import assert_cutout, product_frame, write_video

FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A lossless 12-frame clip at 24 fps; every frame differs (noise seeded by its index)."""
    path = tmp_path_factory.mktemp("video") / "clip.mov"
    frames = [product_frame(96, 64, seed=i) for i in range(FRAMES)]
    decoded = write_video(path, frames, fps=24)
    assert all(np.array_equal(a, b) for a, b in zip(frames, decoded, strict=True))
    return path, frames


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_reader_reports_size_rate_and_yields_frames_in_order(clip) -> None:
    path, frames = clip
    with VideoReader(path) as reader:
        assert (reader.info.width, reader.info.height) == (96, 64)
        assert reader.info.fps == Fraction(24)
        decoded = list(reader)
    assert len(decoded) == FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(decoded, frames, strict=True))


@pytest.mark.parametrize("suffix", [".webm", ".mov"])
def test_alpha_video_keeps_count_rate_and_alpha(tmp_path: Path, clip, suffix: str) -> None:
    path, frames = clip
    with VideoReader(path) as reader:
        info = reader.info
    writer = AlphaVideoWriter(tmp_path / f"out{suffix}", info)
    for index, frame in enumerate(frames):
        alpha = np.zeros(frame.shape[:2], np.uint8)
        alpha[:, : 8 * (index + 1)] = 255  # the opaque band grows one step per frame
        writer.submit(index, frame, alpha)
    writer.close()
    with av.open(str(tmp_path / f"out{suffix}")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 24
        # FFmpeg's native VP9 decoder drops the alpha plane; libvpx's keeps it.
        decoder = av.CodecContext.create("libvpx-vp9", "r") if suffix == ".webm" else None
        decoded = []
        for packet in container.demux(stream):
            decoded.extend(decoder.decode(packet) if decoder else packet.decode())
    assert len(decoded) == FRAMES
    for index, frame in enumerate(decoded):
        alpha = frame.to_ndarray(format="rgba")[..., 3]
        opaque = 8 * (index + 1)
        assert alpha[:, : opaque - 2].min() >= 250, index
        if opaque + 2 < 96:
            assert alpha[:, opaque + 2 :].max() <= 5, index


def test_unreadable_inputs_raise_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="No such file"):
        VideoReader(tmp_path / "missing.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="Invalid data"):
        VideoReader(tmp_path / "text.mp4")
    Image.fromarray(product_frame(32, 32)).save(tmp_path / "still.png")
    with VideoReader(tmp_path / "still.png") as reader:  # one image is a one-frame video
        assert len(list(reader)) == 1


def test_png_sequence_refuses_to_mix_runs(tmp_path: Path) -> None:
    PngSequenceWriter(tmp_path, {"model": "rmbg"}).close()
    with pytest.raises(VideoError, match="different model"):
        PngSequenceWriter(tmp_path, {"model": "yolo"})
    PngSequenceWriter(tmp_path, {"model": "yolo"}, overwrite=True).close()


def _reference_mattes(frames: list[np.ndarray]) -> list[np.ndarray]:
    model = RMBG20Segmentor(standins.RMBG_STANDIN, device="cpu")
    return model.predict(frames)


def test_segment_video_in_process_writes_every_frame_in_order(tmp_path: Path, clip) -> None:
    path, frames = clip
    out = tmp_path / "seq"
    args = [str(path), "-o", str(out), "--model-path", standins.RMBG_STANDIN, "--no-progress"]
    assert main([*args, "--device", "cpu", "--batch-size", "5"]) == 0
    written = sorted(out.glob("frame_*.png"))
    assert [p.name for p in written] == [f"frame_{i:06d}.png" for i in range(FRAMES)]
    mattes = _reference_mattes(frames)
    for png, frame, matte in zip(written, frames, mattes, strict=True):
        pixels = _png(png)
        assert pixels.shape == (64, 96, 4)
        assert_cutout(pixels, frame)  # the frame's own pixels, in order
        assert np.abs(pixels[..., 3].astype(int) - matte.astype(int)).max() <= 1
    manifest = json.loads((out / "segment-video.json").read_text())
    assert manifest["fps"] == "24" and manifest["model"] == "rmbg"

    # Resume: only the missing frames are segmented again; finished ones are not touched.
    kept = {p.name: p.stat().st_mtime_ns for p in written[:7]}
    for p in written[7:]:
        p.unlink()
    assert main([*args, "--device", "cpu"]) == 0
    assert len(list(out.glob("frame_*.png"))) == FRAMES
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("frame_*.png"))[:7]} == kept
    assert_cutout(_png(out / "frame_000011.png"), frames[11])


def test_segment_video_yolo_to_webm(tmp_path: Path, clip) -> None:
    path, _ = clip
    out = tmp_path / "objects.webm"
    args = ["--model", "yolo", "--model-path", standins.YOLO_STANDIN, "--device", "cpu"]
    assert main([str(path), "-o", str(out), *args, "--no-progress"]) == 0
    with VideoReader(out) as reader:
        assert reader.info.fps == 24
        assert len(list(reader)) == FRAMES


def test_segment_video_fails_clearly(tmp_path: Path, capsys, clip) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    assert main([str(tmp_path / "broken.mp4"), "-o", str(tmp_path / "out")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main([str(clip[0]), "-o", str(tmp_path / "out.mp4")]) == 2
    assert "MP4 has no alpha channel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(clip[0]), "-o", str(tmp_path / "x"), "--classes", "a,b"])
    assert exit_info.value.code == 2


def test_png_written_atomically(tmp_path: Path) -> None:
    writer = PngSequenceWriter(tmp_path, {})
    frame = product_frame(40, 30)
    writer.submit(3, frame, np.full((30, 40), 7, np.uint8)).result()
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_000003.png", "segment-video.json"]
    pixels = np.asarray(Image.open(io.BytesIO((tmp_path / "frame_000003.png").read_bytes())))
    assert_cutout(pixels, frame)
    assert (pixels[..., 3] == 7).all()
