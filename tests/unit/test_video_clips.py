"""segment-video on clips as cameras and phones make them: variable frame rate, B-frames,
audio, a display matrix, odd sizes, HD colour; resumes that must match the job; outputs that
cannot be written. The clips are made here with PyAV and every output is read back with it."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation_client.segment_video import main
from segmentation_client.video import (
    ENCODE_PRESETS,
    AlphaVideoWriter,
    PngSequenceWriter,
    VideoError,
    VideoReader,
    output_kind,
    png_is_complete,
)
from tests.conftest import assert_cutout, product_frame

#: A 10-frame variable-frame-rate clip spanning 3.08 s: frame times, and the last one's length.
VFR_TIMES = [0.0, 0.1, 0.15, 0.5, 1.0, 1.02, 1.5, 2.0, 2.9, 3.0]
VFR_LAST = 0.08
TIME_BASE = Fraction(1, 16000)


@pytest.fixture(autouse=True)
def small_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-ins at their smallest input sizes: these tests are about frames, not mattes."""
    monkeypatch.setenv("RMBG_INPUT_SIZE", "64")
    monkeypatch.setenv("YOLO_IMGSZ", "64")


def make_clip(
    path: Path,
    frames: list[np.ndarray],
    *,
    times: list[float] | None = None,
    last: float | None = None,
    codec: str = "png",
    rotation: float | None = None,
    hflip: bool = False,
    audio: bool = False,
    options: dict[str, str] | None = None,
) -> None:
    """``frames`` at ``times`` (seconds; default 25 fps), in ``TIME_BASE`` ticks, each packet
    as long as the gap to the next (the last: ``last``). ``png`` is lossless RGB; ``libx264``
    uses B-frames. ``rotation`` sets the display matrix (PyAV's counter-clockwise degrees, as
    ``VideoFrame.rotation`` reads it back), ``hflip`` a left-right flip after it; ``audio``
    adds an AAC track."""
    times = times or [i / 25 for i in range(len(frames))]
    ticks = [round(t / TIME_BASE) for t in times]
    ends = [*ticks[1:], ticks[-1] + round((last or 1 / 25) / TIME_BASE)]
    durations = dict(zip(ticks, (e - t for t, e in zip(ticks, ends, strict=True)), strict=True))
    with av.open(str(path), mode="w") as container:
        stream: Any = container.add_stream(codec, rate=25, options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb24" if codec == "png" else "yuv420p"
        stream.codec_context.time_base = TIME_BASE
        stream.time_base = TIME_BASE
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        sound: Any = container.add_stream("aac", rate=48000) if audio else None

        def mux(packets: list[Any]) -> None:
            for packet in packets:
                packet.duration = durations[packet.pts]
            container.mux(packets)

        for index, (frame, tick) in enumerate(zip(frames, ticks, strict=True)):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = tick, TIME_BASE
            mux(stream.encode(picture))
            if sound is not None:
                samples = av.AudioFrame.from_ndarray(
                    np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
                )
                samples.sample_rate, samples.pts = 48000, index * 1024
                container.mux(sound.encode(samples))
        mux(stream.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))


def decoded(path: Path) -> tuple[list[np.ndarray], list[float], Any]:
    """The frames of ``path`` as segment-video's reader decodes them (RGB, no display matrix
    applied), their times from the first frame, and the stream's time base."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        time_base = stream.time_base
    start = frames[0].pts
    return (
        [f.to_ndarray(format="rgb24") for f in frames],
        [float((f.pts - start) * time_base) for f in frames],
        time_base,
    )


def video_packets(path: Path) -> tuple[list[tuple[int, int]], Fraction, Any]:
    """(pts, duration) of each video packet, the stream's time base, and its codec context."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.duration) for p in container.demux(stream) if p.size]
        return packets, stream.time_base, stream.codec_context


def alpha_frames(path: Path) -> list[av.VideoFrame]:
    """Every frame of an output video, alpha kept (libvpx decodes VP9's alpha plane)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoder = av.CodecContext.create("libvpx-vp9", "r") if path.suffix == ".webm" else None
        frames = []
        for packet in container.demux(stream):
            frames.extend(decoder.decode(packet) if decoder else packet.decode())
    return frames


def alpha_plane(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame's alpha plane as 8-bit levels, read from the plane itself: what a
    compositor uses. (FFmpeg 8's swscale reads past the alpha plane of an odd-width
    ``yuva420p`` frame when converting it to RGBA; the plane itself is right.)"""
    if frame.format.name in ("argb", "rgba"):  # packed RGB (QuickTime Animation)
        return frame.to_ndarray(format="rgba")[..., 3]
    plane = frame.planes[3]
    deep = frame.format.name.endswith(("10le", "12le", "16le"))
    samples = np.frombuffer(bytes(plane), np.uint16 if deep else np.uint8)
    rows = samples.reshape(frame.height, -1)[:, : frame.width].astype(np.float64)
    top = (1 << int(frame.format.name[-4:-2])) - 1 if deep else 255
    return np.round(rows * 255 / top).astype(np.uint8)


def run(clip: Path, output: Path | str, *extra: str) -> int:
    return main(
        [
            str(clip),
            "-o",
            str(output),
            "--model-path",
            standins.RMBG_STANDIN,
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("vfr") / "vfr.mov"
    frames = [product_frame(64, 48, seed=i) for i in range(len(VFR_TIMES))]
    make_clip(path, frames, times=VFR_TIMES, last=VFR_LAST)
    with av.open(str(path)) as container:
        assert container.duration == pytest.approx(3.08e6, abs=100)  # what a player shows
    return path, frames


@pytest.mark.parametrize("suffix", [".webm", ".mov", "/"])
def test_a_variable_frame_rate_clip_keeps_every_frame_time_and_its_length(
    tmp_path: Path, vfr_clip, suffix: str
) -> None:
    clip, frames = vfr_clip
    output = tmp_path / "out" if suffix == "/" else tmp_path / f"out{suffix}"
    report = tmp_path / "report.json"
    assert run(clip, f"{output}{suffix if suffix == '/' else ''}", "--report", str(report)) == 0
    assert json.loads(report.read_text())["duration"] == pytest.approx(3.08, abs=1e-6)
    if suffix == "/":
        stamps = json.loads((output / "segment-video.json").read_text())["timestamps"]
        assert stamps["times"] == pytest.approx(VFR_TIMES, abs=1e-6)
        assert stamps["pts"] == [round(t / TIME_BASE) for t in VFR_TIMES]
        assert (stamps["time_base"], stamps["duration"]) == ("1/16000", pytest.approx(3.08))
        written = sorted(output.glob("frame_*.png"))
        assert len(written) == len(frames)
        for png, frame in zip(written, frames, strict=True):
            assert_cutout(np.asarray(Image.open(png)), frame)
        return
    packets, time_base, _ = video_packets(output)
    tick = float(time_base)  # WebM counts milliseconds, this MOV the source's 1/16000 s
    assert len(packets) == len(frames) == len(alpha_frames(output))
    assert [p * tick for p, _ in packets] == pytest.approx(VFR_TIMES, abs=tick)
    end = (packets[-1][0] + packets[-1][1]) * tick
    assert end == pytest.approx(3.08, abs=tick)  # the clip's length, last frame included
    with av.open(str(output)) as container:
        assert container.duration / 1e6 == pytest.approx(3.08, abs=tick)


def test_b_frames_and_audio_keep_presentation_order_times_and_count(tmp_path: Path) -> None:
    clip = tmp_path / "phone.mp4"
    frames = [product_frame(64, 48, seed=30 + i) for i in range(14)]
    times = [0.0, 0.04, 0.08, 0.2, 0.24, 0.3, 0.5, 0.54, 0.58, 0.7, 0.9, 0.94, 1.3, 1.34]
    make_clip(clip, frames, times=times, codec="libx264", audio=True, options={"bf": "3"})
    with av.open(str(clip)) as container:
        assert len(container.streams.audio) == 1
        reordered = [p for p in container.demux(video=0) if p.size and p.pts != p.dts]
    assert reordered, "the clip should have B-frames (packets out of presentation order)"
    source, source_times, _ = decoded(clip)
    assert source_times == pytest.approx(times, abs=1e-4)

    out = tmp_path / "seq"
    assert run(clip, out) == 0
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == len(frames)
    for png, frame in zip(written, source, strict=True):
        assert_cutout(np.asarray(Image.open(png)), frame)  # each frame its own, in order
    stamps = json.loads((out / "segment-video.json").read_text())["timestamps"]
    assert stamps["times"] == pytest.approx(source_times, abs=1e-6)

    video = tmp_path / "phone.webm"
    assert run(clip, video) == 0
    packets, time_base, _ = video_packets(video)
    assert [p * float(time_base) for p, _ in packets] == pytest.approx(times, abs=1e-3)
    with av.open(str(video)) as container:
        assert not container.streams.audio  # audio is not copied; the video is whole
    assert len(alpha_frames(video)) == len(frames)


def _portrait() -> np.ndarray:
    """An upright portrait frame with a marker in its top-left corner."""
    upright = product_frame(48, 64, seed=5)
    upright[:6, :6] = (20, 200, 20)
    return upright


@pytest.mark.parametrize(
    ("rotation", "stored", "described"),
    [
        (-90, 1, "rotated 90 degrees clockwise"),  # a phone held upright: display turns CW
        (90, -1, "rotated 270 degrees clockwise"),
        (180, 2, "rotated 180 degrees clockwise"),
    ],
)
def test_the_reader_turns_frames_upright_by_the_display_matrix(
    tmp_path: Path, rotation: int, stored: int, described: str
) -> None:
    upright = _portrait()
    clip = tmp_path / "rotated.mov"
    # The camera stores the frame turned; the matrix tells players how to turn it back.
    make_clip(clip, [np.ascontiguousarray(np.rot90(upright, stored))] * 2, rotation=rotation)
    with VideoReader(clip) as reader:
        assert (reader.info.width, reader.info.height) == (48, 64)
        assert reader.info.orientation.describe() == described
        got = list(reader)
    assert len(got) == 2 and all(np.array_equal(g, upright) for g in got)


def test_a_mirrored_display_matrix_is_applied_as_ffmpeg_applies_it(tmp_path: Path) -> None:
    """A quarter turn with a flip (a front camera's selfie): FFmpeg shows it transposed
    (``transpose=cclock_flip``), and so does the reader."""
    upright = _portrait()
    clip = tmp_path / "selfie.mov"
    make_clip(clip, [np.ascontiguousarray(upright.transpose(1, 0, 2))], rotation=-90, hflip=True)
    with VideoReader(clip) as reader:
        assert reader.info.orientation.describe() == "rotated 90 degrees clockwise, mirrored"
        (got,) = list(reader)
    assert np.array_equal(got, upright)


def test_a_portrait_phone_clip_is_segmented_and_written_upright(tmp_path: Path, capsys) -> None:
    upright = _portrait()
    clip = tmp_path / "portrait.mov"
    make_clip(clip, [np.ascontiguousarray(np.rot90(upright, 1))] * 3, rotation=-90)
    out, report = tmp_path / "seq", tmp_path / "report.json"
    assert run(clip, out, "--report", str(report)) == 0
    assert "3 frames (rotated 90 degrees clockwise)" in capsys.readouterr().err
    summary = json.loads(report.read_text())
    assert (summary["width"], summary["height"]) == (48, 64)
    assert summary["orientation"] == "rotated 90 degrees clockwise"
    for png in sorted(out.glob("frame_*.png")):
        assert_cutout(np.asarray(Image.open(png)), upright)  # the model saw it upright too

    cutout = np.asarray(Image.open(out / "frame_000000.png")).astype(int)

    video = tmp_path / "portrait.webm"
    assert run(clip, video) == 0
    frames = alpha_frames(video)
    assert len(frames) == 3
    for frame in frames:
        # Upright pixels, and no rotation of its own for a player to apply twice.
        assert (frame.width, frame.height, frame.rotation) == (48, 64, 0)
        rgba = frame.to_ndarray(format="rgba").astype(int)
        upright_error = np.abs(rgba - cutout).mean()
        assert upright_error < 8
        assert upright_error < np.abs(rgba - cutout[::-1, ::-1]).mean() / 2  # not turned


@pytest.mark.parametrize("preset", ENCODE_PRESETS)
@pytest.mark.parametrize("suffix", [".webm", ".mov", "/"])
@pytest.mark.parametrize("size", [(65, 48), (64, 47), (33, 17)])
def test_odd_widths_and_heights_in_every_format(
    tmp_path: Path, suffix: str, size: tuple[int, int], preset
) -> None:
    width, height = size
    frames = [product_frame(width, height, seed=i) for i in range(4)]
    clip = tmp_path / "odd.mov"
    make_clip(clip, frames)
    with VideoReader(clip) as reader:
        info = reader.info
        decoded_frames = list(reader)
    mattes = [np.where(np.arange(width) < 4 * (i + 3), 255, 0).astype(np.uint8) for i in range(4)]
    mattes = [np.repeat(m[None, :], height, axis=0) for m in mattes]
    if suffix == "/":
        writer: Any = PngSequenceWriter(tmp_path / "seq", {}, preset=preset)
    else:
        writer = AlphaVideoWriter(
            tmp_path / f"out{suffix}", info, preset=preset, times=reader.times
        )
    pairs = enumerate(zip(decoded_frames, mattes, strict=True))
    for write in [writer.submit(i, frame, matte) for i, (frame, matte) in pairs]:
        write.result()
    writer.close()
    if suffix == "/":
        for index in range(4):
            pixels = np.asarray(Image.open(tmp_path / "seq" / f"frame_{index:06d}.png"))
            assert_cutout(pixels, frames[index])
            assert np.array_equal(pixels[..., 3], mattes[index])
        return
    out = alpha_frames(tmp_path / f"out{suffix}")
    assert len(out) == 4
    for index, frame in enumerate(out):
        assert (frame.width, frame.height) == size
        alpha = alpha_plane(frame)
        edge = 4 * (index + 3)
        assert alpha[:, : edge - 2].min() >= 250, index
        assert alpha[:, edge + 2 :].max() <= 5, index


def test_segment_video_writes_an_odd_width_mov_with_the_default_preset(tmp_path: Path) -> None:
    """The default ProRes encoder (prores_aw) cannot open at 321 pixels, and FFmpeg's ProRes
    encoders miscode alpha at widths that are not a multiple of 16: the run writes QuickTime
    Animation instead of failing after the model ran."""
    clip = tmp_path / "odd.mov"
    make_clip(clip, [product_frame(321, 241, seed=i) for i in range(3)])
    assert run(clip, tmp_path / "odd-out.mov") == 0
    frames = alpha_frames(tmp_path / "odd-out.mov")
    assert [(f.width, f.height) for f in frames] == [(321, 241)] * 3


@pytest.mark.parametrize(
    ("size", "tag", "matrix"), [((1280, 720), 1, "ITU709"), ((320, 240), 6, "ITU601")]
)
@pytest.mark.parametrize("suffix", [".webm", ".mov"])
def test_videos_are_bt709_for_hd_and_bt601_below_and_tagged_so(
    tmp_path: Path, suffix: str, size: tuple[int, int], tag: int, matrix: str
) -> None:
    width, height = size
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = (180, 40, 30)
    clip = tmp_path / "flat.mov"
    make_clip(clip, [frame, frame])
    with VideoReader(clip) as reader:
        writer = AlphaVideoWriter(tmp_path / f"out{suffix}", reader.info, times=reader.times)
        for index, pixels in enumerate(reader):
            writer.submit(index, pixels, np.full((height, width), 255, np.uint8)).result()
        writer.close()
    _, _, context = video_packets(tmp_path / f"out{suffix}")
    assert (context.color_primaries, context.color_trc, context.colorspace) == (tag, tag, tag)
    for decoded_frame in alpha_frames(tmp_path / f"out{suffix}"):
        # What a player that goes by the size (and one that reads the tags) shows.
        shown = decoded_frame.reformat(format="rgb24", src_colorspace=matrix).to_ndarray()
        assert np.abs(shown[height // 2, width // 2].astype(int) - (180, 40, 30)).max() <= 4
        tagged = decoded_frame.to_ndarray(format="rgb24")
        assert np.abs(tagged[height // 2, width // 2].astype(int) - (180, 40, 30)).max() <= 4


def test_untagged_hd_input_is_read_as_bt709(tmp_path: Path) -> None:
    """An HD clip that does not say which matrix made its YUV is BT.709 to every player."""
    rgb = av.VideoFrame.from_ndarray(np.full((720, 1280, 3), (180, 40, 30), np.uint8))
    yuv = rgb.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
    clip = tmp_path / "hd.mkv"
    with av.open(str(clip), mode="w") as container:
        stream: Any = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        yuv.pts, yuv.colorspace = 0, 2  # AVCOL_SPC_UNSPECIFIED: the file does not say
        container.mux(stream.encode(yuv))
        container.mux(stream.encode(None))
    with VideoReader(clip) as reader:
        (pixels,) = list(reader)
    assert np.abs(pixels[360, 640].astype(int) - (180, 40, 30)).max() <= 4  # BT.601: 11


# Resume: only into the same job.


@pytest.fixture
def short_clip(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    frames = [product_frame(64, 48, seed=50 + i) for i in range(6)]
    (tmp_path / "a").mkdir()
    make_clip(tmp_path / "a" / "clip.mov", frames)
    return tmp_path / "a" / "clip.mov", frames


def test_a_different_clip_of_the_same_name_does_not_resume_into_the_frames(
    tmp_path: Path, short_clip, capsys
) -> None:
    clip, _ = short_clip
    out = tmp_path / "seq"
    assert run(clip, out) == 0
    before = {p.name: p.read_bytes() for p in out.glob("frame_*.png")}
    other = tmp_path / "b" / "clip.mov"
    other.parent.mkdir()
    others = [product_frame(64, 48, seed=90 + i) for i in range(6)]
    make_clip(other, others)
    capsys.readouterr()
    assert run(other, out) == 2
    err = capsys.readouterr().err
    assert "holds frames of another job: different input_sha256_first_mib" in err
    assert "--overwrite" in err and err.count("\n") == 1  # one line
    assert {p.name: p.read_bytes() for p in out.glob("frame_*.png")} == before  # untouched
    # --overwrite starts over: every frame is the new clip's.
    assert run(other, out, "--overwrite") == 0
    for index, frame in enumerate(others):
        assert_cutout(np.asarray(Image.open(out / f"frame_{index:06d}.png")), frame)
    manifest = json.loads((out / "segment-video.json").read_text())
    assert manifest["recorded"]["input_path"] == str(other)


def test_changed_detection_options_do_not_resume_into_the_frames(
    tmp_path: Path, short_clip, capsys
) -> None:
    clip, _ = short_clip
    out = tmp_path / "objects"
    yolo = ["--model", "yolo", "--model-path", standins.YOLO_STANDIN, "--device", "cpu"]
    base = [str(clip), "-o", str(out), "--no-progress", *yolo]
    assert main([*base, "--conf", "0.3"]) == 0
    capsys.readouterr()
    assert main([*base, "--conf", "0.5"]) == 2
    assert "different conf (0.3 then, 0.5 now)" in capsys.readouterr().err
    assert main([*base, "--conf", "0.3", "--classes", "1,2"]) == 2
    assert "different classes (null then, [1, 2] now)" in capsys.readouterr().err
    assert main([*base, "--conf", "0.3"]) == 0  # the same job resumes (nothing left to do)
    assert "(6 were already done)" in capsys.readouterr().err


def test_incomplete_frame_files_are_written_again_on_resume(
    tmp_path: Path, short_clip, capsys
) -> None:
    clip, frames = short_clip
    out = tmp_path / "seq"
    assert run(clip, out) == 0
    assert not list(out.glob(".*.partial"))  # every frame took its name once written
    whole = {p.name: p.stat().st_mtime_ns for p in out.glob("frame_*.png")}
    truncated = out / "frame_000002.png"
    truncated.write_bytes(truncated.read_bytes()[:100])  # cut off mid-file
    (out / "frame_000004.png").write_bytes(b"")  # created, never written
    (out / "frame_000005.png").unlink()
    (out / ".frame_000005.png.partial").write_bytes(b"\x89PNG")  # a write that died
    assert not png_is_complete(truncated, 64, 48)
    capsys.readouterr()
    assert run(clip, out) == 0
    assert "6 frames -> " in capsys.readouterr().err
    for index, frame in enumerate(frames):
        path = out / f"frame_{index:06d}.png"
        assert png_is_complete(path, 64, 48)
        assert_cutout(np.asarray(Image.open(path)), frame)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("frame_*.png")}
    assert {n for n in kept if kept[n] == whole.get(n)} == {f"frame_{i:06d}.png" for i in (0, 1, 3)}
    assert not list(out.glob(".*.partial"))


def test_frame_files_without_a_manifest_are_not_adopted(tmp_path: Path) -> None:
    (tmp_path / "frame_000000.png").write_bytes(b"")
    with pytest.raises(VideoError, match=r"no segment-video\.json"):
        PngSequenceWriter(tmp_path, {"model": "rmbg"})


# Outputs that cannot be written: found before the model is built (a model that cannot be
# built would exit 1; each of these exits 2, with one line).

BAD_MODEL = ["--model-path", "/nonexistent/model-directory"]


def _refused(capsys, argv: list[str], expected: str) -> None:
    capsys.readouterr()
    assert main([*argv, "--no-progress", "--device", "cpu", *BAD_MODEL]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_outputs_exit_2_before_any_work(tmp_path: Path, short_clip, capsys) -> None:
    clip, _ = short_clip
    a_file = tmp_path / "notes"
    a_file.write_text("not a directory")
    _refused(capsys, [str(clip), "-o", str(a_file)], "it is a file, not a directory")
    _refused(capsys, [str(clip), "-o", str(a_file / "seq")], "cannot write the output")
    _refused(capsys, [str(clip), "-o", str(a_file / "out.webm")], "cannot write the output")
    (tmp_path / "dir.webm").mkdir()
    _refused(capsys, [str(clip), "-o", str(tmp_path / "dir.webm")], "it is a directory")
    (tmp_path / "done.mov").write_bytes(b"earlier")
    _refused(capsys, [str(clip), "-o", str(tmp_path / "done.mov")], "exists; pass --overwrite")
    # /proc takes no new directories, whoever asks (root included).
    _refused(capsys, [str(clip), "-o", "/proc/segment-video-test/seq"], "cannot write")
    _refused(capsys, [str(clip), "-o", "/proc/segment-video-test.webm"], "cannot write")
    out = tmp_path / "never"
    for report in (tmp_path, a_file / "report.json", Path("/proc/no/report.json")):
        argv = [str(clip), "-o", str(out), "--report", str(report)]
        _refused(capsys, argv, "cannot write the report")
    assert not out.exists()  # the report was checked before the output was made


def test_directory_names_may_hold_dots(tmp_path: Path, short_clip) -> None:
    clip, frames = short_clip
    assert output_kind(str(tmp_path / "clip_01.frames")) == "png"
    assert output_kind(str(tmp_path / "clip_01.mp4") + "/") == "png"
    assert output_kind("cutout.WEBM") == ".webm"
    with pytest.raises(VideoError, match="MP4 has no alpha channel"):
        output_kind(str(tmp_path / "clip.mp4"))
    out = tmp_path / "shots" / "clip_01.frames"
    assert run(clip, f"{out}/") == 0
    assert len(list(out.glob("frame_*.png"))) == len(frames)
    assert run(clip, out) == 0  # the same directory, without the slash: resumed, not refused


# Cutout options: edge colours refined, cutouts over a colour. The product stand-in's mattes
# are 0 on the background, 255 inside the object and soft between (the tiny one's are soft
# everywhere), so what changes where can be told apart.

PRODUCT = ["--model-path", standins.PRODUCT_RMBG, "--device", "cpu", "--no-progress"]
#: The colour of product_frame's object (an ellipse, hard-edged, on a light noisy ground).
OBJECT_COLOUR = np.array([180, 40, 30])


def product_run(clip: Path, output: Path, *extra: str) -> int:
    return main([str(clip), "-o", str(output), *PRODUCT, *extra])


def frame_png(directory: Path, index: int) -> np.ndarray:
    return np.asarray(Image.open(directory / f"frame_{index:06d}.png"))


def over(frame: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int, int]) -> np.ndarray:
    """``frame`` under ``alpha`` laid over ``colour`` ("over" compositing), in float64 and
    rounded to levels: RGB on an opaque colour, RGBA otherwise."""
    a = alpha[..., None] / 255
    back, back_alpha = np.array(colour[:3]) / 255, colour[3] / 255
    out_alpha = a + back_alpha * (1 - a)
    colours = (frame / 255 * a + back * back_alpha * (1 - a)) / np.maximum(out_alpha, 1e-12)
    levels = np.round(np.where(out_alpha > 0, colours, 0) * 255)
    return levels if colour[3] == 255 else np.concatenate([levels, np.round(out_alpha * 255)], -1)


def test_bg_color_lays_every_frame_over_the_colour(tmp_path: Path, short_clip) -> None:
    clip, frames = short_clip
    assert product_run(clip, tmp_path / "plain") == 0
    for text, colour in [("81d4fa", (129, 212, 250, 255)), ("10,20,30,128", (10, 20, 30, 128))]:
        out, report = tmp_path / text, tmp_path / f"{text}.json"
        assert product_run(clip, out, "--bg-color", text, "--report", str(report)) == 0
        options = json.loads(report.read_text())["options"]
        assert options["bg_color"] == "".join(f"{c:02x}" for c in colour)
        assert options["refine"] is False and options["model_path"] == standins.PRODUCT_RMBG
        for index, frame in enumerate(frames):
            alpha = frame_png(tmp_path / "plain", index)[..., 3]
            assert (alpha == 0).any() and (alpha == 255).any() and (alpha % 255 > 0).any()
            pixels = frame_png(out, index)
            assert pixels.shape == (48, 64, 3 if colour[3] == 255 else 4)
            assert np.abs(pixels.astype(int) - over(frame, alpha, colour)).max() <= 1


@pytest.mark.parametrize(
    ("suffix", "codec"), [(".mp4", "h264"), (".webm", "vp9"), (".mov", "prores")]
)
def test_an_opaque_bg_color_writes_videos_without_alpha(
    tmp_path: Path, short_clip, suffix: str, codec: str
) -> None:
    clip, frames = short_clip
    assert product_run(clip, tmp_path / "plain") == 0
    out = tmp_path / f"on-blue{suffix}"
    colour = (0, 90, 200, 255)
    assert product_run(clip, out, "--bg-color", "0,90,200") == 0
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == codec
    written = alpha_frames(out)
    assert len(written) == len(frames)
    for index, (picture, frame) in enumerate(zip(written, frames, strict=True)):
        assert not picture.format.name.startswith(("yuva", "argb", "rgba")), picture.format.name
        alpha = frame_png(tmp_path / "plain", index)[..., 3]
        error = np.abs(picture.to_ndarray(format="rgb24").astype(int) - over(frame, alpha, colour))
        # Lossy 4:2:0 (4:4:4 for ProRes) on a noisy ground: a few levels on average; the
        # flat colour itself, away from the object's edge, within two.
        assert error.mean() <= 6, error.mean()
        background = ~np.pad(alpha > 0, 4, mode="edge")  # the object's edge and 4 px beyond
        background = ~np.lib.stride_tricks.sliding_window_view(background, (9, 9)).any((2, 3))
        assert np.median(error[background]) <= 2


def test_refine_in_process_changes_only_the_soft_edges(tmp_path: Path, short_clip) -> None:
    import torch

    from segmentation.compose import compose
    from segmentation.options import CutoutOptions

    clip, frames = short_clip
    assert product_run(clip, tmp_path / "plain") == 0
    report = tmp_path / "report.json"
    assert product_run(clip, tmp_path / "refined", "--refine", "--report", str(report)) == 0
    assert json.loads(report.read_text())["options"]["refine"] is True
    for index, frame in enumerate(frames):
        plain, refined = (
            frame_png(tmp_path / "plain", index),
            frame_png(tmp_path / "refined", index),
        )
        alpha = plain[..., 3]
        assert np.array_equal(refined[..., 3], alpha)
        soft = (alpha > 0) & (alpha < 255)
        assert soft.any() and np.array_equal(refined[~soft], plain[~soft])
        # The edges carry the object's colour, not the light ground's: the fringe is gone.
        plain_off, refined_off = (
            np.abs(pixels[soft][:, :3].astype(int) - OBJECT_COLOUR).mean()
            for pixels in (plain, refined)
        )
        assert refined_off < plain_off / 3
        # What the service answers for refine=true on this frame and matte.
        rgb = torch.from_numpy(frame).permute(2, 0, 1).contiguous()
        matte = torch.from_numpy(alpha.copy())
        expected = compose(rgb, matte, CutoutOptions(refine=True)).pixels
        assert np.array_equal(refined, expected)


def test_changed_cutout_options_do_not_resume_into_the_frames(
    tmp_path: Path, short_clip, capsys
) -> None:
    clip, _ = short_clip
    out = tmp_path / "seq"
    assert run(clip, out) == 0
    capsys.readouterr()
    assert run(clip, out, "--bg-color", "white") == 2
    assert "different bg_color ((none) then, ffffffff now)" in capsys.readouterr().err
    assert run(clip, out, "--refine") == 2
    assert "different refine ((none) then, true now)" in capsys.readouterr().err

    on_white = tmp_path / "on-white"
    assert run(clip, on_white, "--bg-color", "fff") == 0
    capsys.readouterr()
    assert run(clip, on_white, "--bg-color", "White") == 0  # one colour, however spelt
    assert "(6 were already done)" in capsys.readouterr().err
    assert run(clip, on_white, "--bg-color", "black") == 2
    err = capsys.readouterr().err
    assert "different bg_color (ffffffff then, 000000ff now)" in err and err.count("\n") == 1
    assert run(clip, on_white) == 2
    assert "different bg_color (ffffffff then, (none) now)" in capsys.readouterr().err


def test_bad_cutout_options_exit_2_with_a_message(tmp_path: Path, short_clip, capsys) -> None:
    clip, _ = short_clip
    for extra, expected in [
        (["--bg-color", "nope"], "argument --bg-color: colour 'nope': expected hex"),
        (["--bg-color", "1,2,300"], "decimal colours are r,g,b or r,g,b,a, each 0-255"),
        (["--crop"], "--crop is not supported: every frame of a video or PNG sequence"),
        (["--refine", "--model", "yolo"], "--refine needs --model rmbg"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(clip, tmp_path / "out", *extra)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--crop" in capsys.readouterr().out  # and says why it is not supported
    # An MP4 needs opaque frames of an even size.
    mp4 = tmp_path / "out.mp4"
    _refused(capsys, [str(clip), "-o", str(mp4), "--bg-color", "ffffff80"], "no alpha channel")
    odd = tmp_path / "odd.mov"
    make_clip(odd, [product_frame(65, 48)])
    _refused(capsys, [str(odd), "-o", str(mp4), "--bg-color", "fff"], "even width and height")
