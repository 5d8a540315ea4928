"""Video in, RGBA out: readers and writers, and segment-video run in-process on stand-ins."""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation.local import LocalRunner
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import Detections
from segmentation_client.segment_video import main, segment_frames
from segmentation_client.video import (
    ENCODE_PRESETS,
    AlphaVideoWriter,
    PngSequenceWriter,
    VideoError,
    VideoReader,
)
from segmentation_client.wire import cutout_rgba, over_color, parse_color
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


def _band(frame: np.ndarray, index: int) -> np.ndarray:
    """A matte whose opaque band grows one step per frame: each frame's alpha is its own."""
    alpha = np.zeros(frame.shape[:2], np.uint8)
    alpha[:, : 8 * (index + 1)] = 255
    return alpha


@pytest.mark.parametrize("preset", ENCODE_PRESETS)
@pytest.mark.parametrize("suffix", [".webm", ".mov"])
def test_alpha_video_keeps_count_rate_and_alpha(tmp_path: Path, clip, suffix: str, preset) -> None:
    path, frames = clip
    with VideoReader(path) as reader:
        info = reader.info
    # Four converter threads: conversions finish out of order, the encoder must not.
    writer = AlphaVideoWriter(tmp_path / f"out{suffix}", info, preset=preset, threads=4)
    for index, frame in enumerate(frames):
        writer.submit(index, frame, _band(frame, index))
    writer.close()
    assert writer.timer.seconds["encode"] > 0 and writer.timer.seconds["convert"] > 0
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


@pytest.mark.parametrize("preset", ENCODE_PRESETS)
def test_png_sequence_keeps_every_frames_alpha_at_every_preset(
    tmp_path: Path, clip, preset
) -> None:
    _, frames = clip
    writer = PngSequenceWriter(tmp_path, {}, preset=preset, threads=4)
    pending = [writer.submit(i, f, _band(f, i)) for i, f in enumerate(frames)]
    for write in pending:
        write.result()
    writer.close()
    for index, frame in enumerate(frames):
        pixels = _png(tmp_path / f"frame_{index:06d}.png")
        assert_cutout(pixels, frame)
        assert np.array_equal(pixels[..., 3], _band(frame, index)), index


def test_alpha_video_refuses_frames_out_of_order(tmp_path: Path, clip) -> None:
    path, frames = clip
    with VideoReader(path) as reader:
        writer = AlphaVideoWriter(tmp_path / "out.webm", reader.info)
    writer.submit(0, frames[0], _band(frames[0], 0)).result()
    with pytest.raises(VideoError, match="frame 2 submitted out of order"):
        writer.submit(2, frames[2], _band(frames[2], 2)).result()
    writer.close()


class _JitterySource:
    """Mattes that arrive after random delays (calls overlap), each frame's band by its
    first pixel's seed; records the largest number of calls in flight at once."""

    def __init__(self, chunk: int, window: int) -> None:
        self.chunk, self.window = chunk, window
        self.active = self.most_active = 0

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        await asyncio.sleep(random.uniform(0, 0.02))
        self.active -= 1
        return [_band(f, int(f[0, 0, 0])) for f in frames]


class _ShuffledWriter:
    """Writes finish in random order on four threads, like the PNG pool."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(4)
        self.written: dict[int, tuple[int, np.ndarray]] = {}
        self.finish_order: list[int] = []
        self.lock = threading.Lock()

    def has(self, index: int) -> bool:
        return index in (3, 4)  # written by an "earlier run"

    def submit(self, index: int, frame: np.ndarray, alpha: np.ndarray):
        def write() -> None:
            time.sleep(random.uniform(0, 0.01))
            with self.lock:
                self.written[index] = (int(frame[0, 0, 0]), alpha)
                self.finish_order.append(index)

        return self.pool.submit(write)

    def close(self) -> None:
        self.pool.shutdown()


def test_pipeline_keeps_frame_order_with_calls_and_writes_overlapping() -> None:
    random.seed(1)
    frames = [np.full((8, 96, 3), i, np.uint8) for i in range(23)]
    source, writer = _JitterySource(chunk=3, window=3), _ShuffledWriter()
    stats = asyncio.run(segment_frames(iter(frames), source, writer))
    writer.close()
    assert (stats.processed, stats.skipped) == (21, 2)
    assert stats.first_written is not None
    assert sorted(writer.written) == [i for i in range(23) if i not in (3, 4)]
    for index, (seed, alpha) in writer.written.items():
        assert seed == index  # frame i went to index i, and its own matte with it
        assert np.array_equal(alpha, _band(frames[index], index))
    assert source.most_active == 3  # the window was used: calls overlapped
    assert writer.finish_order != sorted(writer.finish_order)  # writes did finish out of order


def test_a_decode_error_stops_the_run_and_its_decode_thread() -> None:
    def frames():
        yield np.zeros((8, 8, 3), np.uint8)
        raise VideoError("cannot decode 'clip': corrupt packet")

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(VideoError, match="corrupt packet"):
        asyncio.run(segment_frames(frames(), _JitterySource(1, 1), _ShuffledWriter()))
    assert "decode" not in {t.name for t in threading.enumerate()} - before


def test_in_process_batches_pad_to_the_run_batch_size_on_cuda_only() -> None:
    """cuDNN plans are per batch size: a video's short last batch runs at the run's size.
    (No CUDA here: a recording segmentor stands in for the device.)"""
    seen: list[tuple[int, tuple[int, ...] | None]] = []

    class Recording:
        def __init__(self, device: str) -> None:
            self.device = SimpleNamespace(type=device)
            self.batch_buckets: tuple[int, ...] | None = None

        def predict(self, frames: list[np.ndarray]) -> list[np.ndarray]:
            seen.append((len(frames), self.batch_buckets))
            return [np.zeros(f.shape[:2], np.uint8) for f in frames]

    frames = [np.zeros((4, 4, 3), np.uint8)] * 11
    LocalRunner("rmbg", Recording("cuda"), batch_size=4)(frames)
    assert seen == [(4, (4,)), (4, (4,)), (3, (4,))]  # 3 frames, padded to 4 by forward
    seen.clear()
    LocalRunner("rmbg", Recording("cpu"), batch_size=4)(frames)
    assert seen == [(4, None), (4, None), (3, None)]


def test_in_process_cuda_graphs_are_captured_once_after_the_first_batch() -> None:
    """The first batch's mattes come out before the capture (the time to the first frame does
    not change); then one graph at the run's batch size; never on the CPU. (No CUDA here: a
    recording segmentor stands in for the device.)"""
    events: list[object] = []

    class Recording:
        def __init__(self, device: str, kind: str) -> None:
            self.device = SimpleNamespace(type=device)
            self.batch_buckets: tuple[int, ...] | None = None
            self.kind = kind

        def predict(self, frames: list[np.ndarray], *options: object) -> list[object]:
            events.append(len(frames))
            if self.kind == "rmbg":
                return [np.zeros(f.shape[:2], np.uint8) for f in frames]
            return [Detections(f.shape[1], f.shape[0], []) for f in frames]

        def capture_graphs(self, *args: object) -> bool:
            events.append(("capture", *args))
            return True

    frames = [np.zeros((6, 10, 3), np.uint8)] * 11
    runner = LocalRunner("rmbg", Recording("cuda", "rmbg"), batch_size=4, cuda_graphs=True)
    assert [o.alpha.shape for o in runner(frames[:4])] == [(6, 10)] * 4
    assert events == [4] and runner.graph_seconds is None  # first batch out, nothing captured
    runner(frames[4:])
    assert events == [4, ("capture", (4,)), 4, 3]
    assert runner.graph_seconds is not None and runner.graph_seconds >= 0
    events.clear()
    yolo = LocalRunner("yolo", Recording("cuda", "yolo"), batch_size=4, cuda_graphs=True)
    assert [o.alpha.shape for o in yolo(frames)] == [(6, 10)] * 11
    assert events == [4, ("capture", (6, 10), (4,)), 4, 3]  # YOLO's graphs are per frame size
    events.clear()
    cpu = LocalRunner("rmbg", Recording("cpu", "rmbg"), batch_size=4, cuda_graphs=True)
    cpu(frames)
    assert events == [4, 4, 3] and cpu.graph_seconds is None


@pytest.mark.parametrize("failure", ["raises", "declines"])
def test_a_failed_in_process_capture_is_reported_and_not_tried_again(failure: str) -> None:
    """Out of memory while capturing (which cannot happen on this CPU machine: a recording
    segmentor stands in) or a capture the model declines: every batch still runs, eagerly,
    the batch size is not halved, and the run says why there are no graphs."""
    events: list[object] = []

    class Failing:
        device = SimpleNamespace(type="cuda")
        batch_buckets: tuple[int, ...] | None = None
        graph_error: str | None = None

        def predict(self, frames: list[np.ndarray]) -> list[np.ndarray]:
            events.append(len(frames))
            return [np.full(f.shape[:2], 7, np.uint8) for f in frames]

        def capture_graphs(self, sizes: tuple[int, ...]) -> bool:
            events.append(("capture", sizes))
            if failure == "raises":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            self.graph_error = "capture declined"
            return False

    runner = LocalRunner("rmbg", Failing(), batch_size=4, cuda_graphs=True)
    outputs = runner([np.zeros((6, 10, 3), np.uint8)] * 11)
    assert [int(o.alpha[0, 0]) for o in outputs] == [7] * 11
    assert events == [4, ("capture", (4,)), 4, 3]  # once, and the cap stayed 4
    expected = "RuntimeError: CUDA out of memory" if failure == "raises" else "capture declined"
    assert runner.graph_error is not None and runner.graph_error.startswith(expected)
    assert runner.graph_seconds is not None


def _reference_mattes(frames: list[np.ndarray]) -> list[np.ndarray]:
    model = RMBG20Segmentor(standins.RMBG_STANDIN, device="cpu")
    return model.predict(frames)


def test_segment_video_in_process_writes_every_frame_in_order(tmp_path: Path, clip, capsys) -> None:
    path, frames = clip
    out = tmp_path / "seq"
    args = [str(path), "-o", str(out), "--model-path", standins.RMBG_STANDIN, "--no-progress"]
    report = tmp_path / "report.json"
    code = main([*args, "--device", "cpu", "--batch-size", "5", "--report", str(report)])
    assert code == 0
    summary = json.loads(report.read_text())
    assert (summary["frames"], summary["skipped"], summary["mode"]) == (FRAMES, 0, "in-process")
    assert 0 < summary["startup"]["first_batch"] <= summary["time_to_first_frame"]
    # The pace once running leaves the first batch out, its frames and its seconds: it is
    # counted from between the first batch's end and the first frame written.
    later, up = FRAMES - 5, summary["startup"]
    before_first = summary["time_to_first_frame"] - (
        up["process_start"] + up["model_libraries"] + up["model_build"]
    )
    slowest = later / (summary["seconds"] - up["first_batch"])
    fastest = later / (summary["seconds"] - before_first)
    assert slowest * 0.99 <= summary["frames_per_s_after_first_batch"] <= fastest * 1.01
    assert "cuda_graphs" not in summary["startup"]  # not asked for (and no GPU)
    steps = {k: v for k, v in summary["startup"].items() if k.startswith("model_build.")}
    assert set(steps) == {
        f"model_build.{s}" for s in ("code", "device", "init", "weights", "prepare")
    }
    assert sum(steps.values()) <= summary["startup"]["model_build"] + 0.01
    assert summary["time_to_first_frame"] >= summary["startup"]["model_build"]
    assert {"decode", "model", "encode"} <= set(summary["stages"])
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
    assert main([*args, "--device", "cpu", "--encode", "small", "--profile-startup"]) == 0
    assert len(list(out.glob("frame_*.png"))) == FRAMES
    err = capsys.readouterr().err
    assert f"{FRAMES} frames -> {out} (7 were already done)" in err
    assert "first frame after" in err and "start-up process_start" in err
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


# -- cutouts over a colour, and cutouts the writers take as they are ----------------------

COLOUR_SPELLINGS = {
    "ffffff": (255, 255, 255, 255),
    "#FFF": (255, 255, 255, 255),
    "81d4fa77": (0x81, 0xD4, 0xFA, 0x77),
    "#81d4fa": (0x81, 0xD4, 0xFA, 255),
    "0f08": (0x00, 0xFF, 0x00, 0x88),
    "white": (255, 255, 255, 255),
    "Green": (0, 128, 0, 255),
    "10,20,30": (10, 20, 30, 255),
    " 10, 20, 30, 40 ": (10, 20, 30, 40),
}
BAD_COLOURS = ["", "nope", "12345", "#ggg", "1,2", "1,2,3,256", "1,2,-3", "ffffff00ff"]


@pytest.mark.parametrize(("text", "rgba"), COLOUR_SPELLINGS.items())
def test_colours_are_read_in_every_spelling_the_service_documents(
    text: str, rgba: tuple[int, int, int, int]
) -> None:
    """The client's parser, which the service's ``background`` parameter also uses."""
    from segmentation.options import parse_color as service_parse_color

    assert parse_color(text) == rgba
    assert service_parse_color(text) == rgba


@pytest.mark.parametrize("text", BAD_COLOURS)
def test_a_colour_that_is_not_one_is_refused_naming_the_spellings(text: str) -> None:
    """A ValueError in the client; the service's 422 (InvalidRequestError) with its words."""
    from segmentation.errors import InvalidRequestError
    from segmentation.options import parse_color as service_parse_color

    with pytest.raises(ValueError, match="colour"):
        parse_color(text)
    with pytest.raises(InvalidRequestError, match="colour"):
        service_parse_color(text)


@pytest.mark.parametrize(
    "colour",
    [(255, 255, 255, 255), (10, 200, 30, 255), (0, 0, 0, 255), (129, 212, 250, 119),
     (255, 0, 0, 254), (5, 5, 5, 1), (0, 0, 0, 0)],
)  # fmt: skip
def test_a_cutout_over_a_colour_agrees_with_the_service_within_one_level(
    colour: tuple[int, int, int, int],
) -> None:
    import torch

    from segmentation.compose import compose
    from segmentation.options import CutoutOptions

    rng = np.random.default_rng(sum(colour))
    frame = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    matte = rng.integers(0, 256, (61, 83), dtype=np.uint8)
    matte[:8], matte[8:16] = 0, 255  # whole rows hidden and shown, as real mattes have
    service = compose(
        torch.from_numpy(frame).permute(2, 0, 1).contiguous(),
        torch.from_numpy(matte),
        CutoutOptions(background=colour),
    ).pixels
    client = over_color(cutout_rgba(frame, matte), colour)
    assert client.shape == service.shape == (61, 83, 3 if colour[3] == 255 else 4)
    assert np.abs(client.astype(int) - service.astype(int)).max() <= 1
    if colour[3] == 255:  # where the matte is 0 the colour, where it is 255 the frame
        assert (client[:8] == colour[:3]).all() and np.array_equal(client[8:16], frame[8:16])


@pytest.mark.parametrize("colour", [(10, 200, 30, 255), (129, 212, 250, 119), (255, 0, 0, 1)])
def test_a_cutout_over_a_colour_is_exact_for_every_level_and_alpha(
    colour: tuple[int, int, int, int],
) -> None:
    """Every (level, alpha) pair: the nearest level to the exact "over" result (ties up)."""
    level, alpha = (x.astype(np.int64) for x in np.mgrid[0:256, 0:256])
    rgba = np.stack([level] * 3 + [alpha], -1).astype(np.uint8)
    back, opacity = np.array(colour[:3]), colour[3]
    total = alpha * 255 + opacity * (255 - alpha)  # out alpha, in 255ths of a level
    mixed = level[..., None] * alpha[..., None] * 255 + back * opacity * (255 - alpha[..., None])
    expected = (2 * mixed + total[..., None]) // np.maximum(2 * total[..., None], 1)
    if opacity < 255:
        expected = np.concatenate([expected, ((2 * total + 255) // 510)[..., None]], -1)
    assert np.array_equal(over_color(rgba, colour), expected)


def test_writers_take_a_cutout_as_it_is_and_lay_it_over_the_colour(tmp_path: Path) -> None:
    """An ``HxWx4`` cutout (edge colours refined) is written as it is; with a background it is
    composed first: RGB PNGs on an opaque colour, RGBA on a translucent one."""
    frame = product_frame(40, 30)
    rng = np.random.default_rng(1)
    cutout = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    for background, name in [(None, "as-is"), ((0, 128, 255, 255), "opaque"), ((9, 9, 9, 99), "x")]:
        writer = PngSequenceWriter(tmp_path / name, {}, background=background)
        writer.submit(0, frame, cutout).result()
        writer.close()
        pixels = _png(tmp_path / name / "frame_000000.png")
        expected = cutout if background is None else over_color(cutout, background)
        assert np.array_equal(pixels, expected)
    assert _png(tmp_path / "opaque" / "frame_000000.png").shape == (30, 40, 3)
    with pytest.raises(ValueError, match="does not match"):
        PngSequenceWriter(tmp_path / "bad", {}).submit(0, frame, cutout[:20]).result()
