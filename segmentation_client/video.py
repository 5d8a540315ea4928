"""Video frames in (PyAV), RGBA frames out: a PNG sequence or a video with an alpha channel.

Outputs keep the input's frame count, order and frame rate. A PNG sequence is written one
file per frame, atomically (temporary name, then rename), so a file that exists is complete
and an interrupted run resumes where it stopped. Videos with alpha are WebM (VP9, ``yuva420p``)
or QuickTime (ProRes 4444, ``yuva444p10le``); MP4 has no widely supported alpha codec.
Encoders use every core by default (see :data:`DEFAULT_ENCODE` for the measurements): at
libvpx's default effort VP9 with alpha ran at 2.4 frames/s on a 16-core H100 host, a
thirteenth of what the model does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal

import av
import numpy as np
from PIL import Image

from segmentation_client.wire import cutout_rgba

#: ``--encode`` presets: ``fast`` keeps up with the model, ``small`` trades speed for size.
EncodePreset = Literal["fast", "balanced", "small"]
ENCODE_PRESETS: tuple[EncodePreset, ...] = ("fast", "balanced", "small")
#: Chosen by measurement (1080p cutouts with synthetic mattes, 2 busy cores, 2026-11-26): VP9
#: with alpha at libvpx's default effort ran at 1.7 frames/s, ``realtime`` with
#: ``cpu-used=8`` and row/tile threads at 21 (12x; files 16% larger), ``good``/5 at 5.8;
#: PNG level 1 on two threads 10.6 (level 6: 2.7, 9% smaller). The model alone does 32
#: frames/s on an H100, so only ``fast`` keeps up with it without more cores than frames.
DEFAULT_ENCODE: EncodePreset = "fast"
#: Container suffixes that hold a video with alpha, and their codecs.
ALPHA_CODECS: dict[str, str] = {".webm": "VP9", ".mov": "ProRes 4444"}
#: zlib level of PNG frames per preset (1: 4x the speed of Pillow's default 6, 10% larger).
#: ``fast`` frames go through FFmpeg's PNG encoder (see :class:`PngSequenceWriter`).
PNG_COMPRESS_LEVELS: dict[EncodePreset, int] = {"fast": 1, "balanced": 3, "small": 6}
PNG_COMPRESS_LEVEL = PNG_COMPRESS_LEVELS[DEFAULT_ENCODE]
FRAME_PATTERN = "frame_{:06d}.png"
MANIFEST = "segment-video.json"


def encode_threads() -> int:
    """Threads for the encoders: this process's cores (libvpx takes up to 64, zlib any)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(64, cores or 1))


def alpha_codec(
    suffix: str, preset: EncodePreset, threads: int, width: int
) -> tuple[str, str, dict[str, str]]:
    """(encoder, pixel format with alpha, encoder options) for a ``suffix`` video.

    VP9 (libvpx): ``deadline=realtime`` with ``cpu-used`` 8 (``fast``) or 6 (``balanced``),
    ``good``/2 for ``small``; ``row-mt`` plus as many tile columns as the width allows (one
    per 256 pixels, a power of two) let every thread work on one frame, since libvpx encodes
    frames one after another (and the alpha plane as a second stream). ProRes 4444 has no
    speed setting, but FFmpeg has two encoders: ``fast`` uses ``prores_aw`` (frames on
    ``threads``: 3.5x the speed of ``prores_ks`` on 2 cores at 1080p, files 26% smaller on
    noise), ``balanced`` ``prores_ks`` (finer rate control, slices on ``threads``), ``small``
    ``prores_ks`` with the LT quantiser matrix (17% smaller on a 320x240 test clip, softer
    detail). Each keeps alpha within one level of 255.
    """
    if suffix == ".webm":
        tiles = min(max(threads, 1).bit_length() - 1, max(width // 256, 1).bit_length() - 1, 6)
        deadline, cpu_used = {"fast": ("realtime", 8), "balanced": ("realtime", 6)}.get(
            preset, ("good", 2)
        )
        options = {
            "deadline": deadline,
            "cpu-used": str(cpu_used),
            "row-mt": "1",
            "tile-columns": str(tiles),
            "threads": str(threads),
            "crf": "30" if preset != "small" else "34",
            "b:v": "0",
        }
        return "libvpx-vp9", "yuva420p", options
    if suffix == ".mov":
        if preset == "fast":
            return "prores_aw", "yuva444p10le", {"profile": "4", "threads": str(threads)}
        options = {"profile": "4444", "threads": str(threads)}
        if preset == "small":
            options["quant_mat"] = "lt"
        return "prores_ks", "yuva444p10le", options
    raise VideoError(
        f"cannot write a {suffix or 'suffix-less'} video: use a directory (PNG sequence), "
        f"{' or '.join(ALPHA_CODECS)} (video with alpha)"
    )


class StageTimer:
    """Seconds of work per stage, added from any thread (busy time, not wall time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class VideoError(Exception):
    """The input cannot be read as a video, or the output cannot be written."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    #: Frame count from the container header; None when it does not say.
    frames: int | None
    codec: str


class VideoReader:
    """Decoded uint8 RGB frames of the first video stream, in presentation order."""

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> None:
        self.path = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<stream>")
        try:
            self._container: Any = av.open(source)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot read {self.path!r}: {_reason(exc)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{self.path!r} has no video stream")
        self._stream: Any = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        if not rate:
            self._container.close()
            raise VideoError(f"{self.path!r}: the video stream has no frame rate")
        self.info = VideoInfo(
            width=self._stream.codec_context.width,
            height=self._stream.codec_context.height,
            fps=Fraction(rate),
            frames=self._stream.frames or None,
            codec=self._stream.codec_context.name,
        )

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for frame in self._container.decode(self._stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise VideoError(f"cannot decode {self.path!r}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


class PngSequenceWriter:
    """``frame_000000.png``... in ``directory``, encoded by a pool of threads, in any order.

    Both encoders release the interpreter lock: two threads wrote 1080p cutouts 1.75x as fast
    as one on a 2-core machine, so ``threads`` defaults to the cores. ``fast`` uses FFmpeg's
    PNG encoder with the ``sub`` row filter at zlib level 1 (23 ms a 1080p cutout against
    Pillow's 62 at the same level, 1% larger: Pillow tries every filter on every row);
    ``balanced`` and ``small`` use Pillow at zlib levels 3 and 6. Each frame's cutout is
    composed in its worker too, off the caller's event loop.
    ``directory/segment-video.json`` records what the frames are (input, model); resuming
    into a directory made from another input or model is refused unless ``overwrite``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        manifest: dict[str, Any],
        *,
        overwrite: bool = False,
        threads: int | None = None,
        preset: EncodePreset = DEFAULT_ENCODE,
        timer: StageTimer | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_manifest(manifest, overwrite)
        self.threads = threads or encode_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png")
        self._level = PNG_COMPRESS_LEVELS[preset]
        self._fast = preset == "fast"
        self._encoders = threading.local()  # one FFmpeg PNG encoder per worker thread
        self.timer = timer or StageTimer()

    def _check_manifest(self, manifest: dict[str, Any], overwrite: bool) -> None:
        path = self.directory / MANIFEST
        if path.exists() and not overwrite:
            previous = json.loads(path.read_text())
            if previous != manifest:
                changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
                raise VideoError(
                    f"{self.directory} holds frames of another run (different "
                    f"{', '.join(changed) or 'settings'}); pass --overwrite to replace them"
                )
        if overwrite:
            for old in self.directory.glob("frame_*.png"):
                old.unlink()
        path.write_text(json.dumps(manifest, indent=2))

    def path_of(self, index: int) -> Path:
        return self.directory / FRAME_PATTERN.format(index)

    def has(self, index: int) -> bool:
        """Whether frame ``index`` was written by an earlier run (files appear complete)."""
        return self.path_of(index).exists()

    def submit(self, index: int, frame: np.ndarray, alpha: np.ndarray) -> Future[None]:
        return self._pool.submit(self._write, index, frame, alpha)

    def _write(self, index: int, frame: np.ndarray, alpha: np.ndarray) -> None:
        with self.timer.timed("encode"):
            final = self.path_of(index)
            partial = final.with_name(f".{final.name}.partial")
            rgba = cutout_rgba(frame, alpha)
            if self._fast:
                partial.write_bytes(self._encode_png(rgba))
            else:
                Image.fromarray(rgba, mode="RGBA").save(
                    partial, format="PNG", compress_level=self._level
                )
            os.replace(partial, final)

    def _encode_png(self, rgba: np.ndarray) -> bytes:
        """One PNG file's bytes from FFmpeg's encoder (this thread's, made for this size)."""
        height, width = rgba.shape[:2]
        encoder: Any = getattr(self._encoders, "png", None)
        if encoder is None or (encoder.width, encoder.height) != (width, height):
            encoder = av.CodecContext.create("png", "w")
            encoder.width, encoder.height, encoder.pix_fmt = width, height, "rgba"
            encoder.time_base = Fraction(1, 1)
            encoder.thread_count = 1  # frames run in parallel on the pool's threads instead
            encoder.options = {"pred": "sub", "compression_level": str(self._level)}
            self._encoders.png = encoder
        packets = encoder.encode(av.VideoFrame.from_ndarray(rgba, format="rgba"))
        return b"".join(bytes(packet) for packet in packets)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class AlphaVideoWriter:
    """A video with alpha at the input's frame rate; frames are encoded in submission order.

    Two stages so that neither waits for the other: a pool of threads composes each cutout
    and converts it to the encoder's pixel format (swscale, 10-20 ms a 1080p frame, without
    the interpreter lock), and one thread feeds the converted frames to the encoder in index
    order (the encoder itself runs on ``threads``; see :func:`alpha_codec`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        info: VideoInfo,
        *,
        preset: EncodePreset = DEFAULT_ENCODE,
        threads: int | None = None,
        timer: StageTimer | None = None,
    ) -> None:
        self.path = Path(path)
        self.threads = threads or encode_threads()
        codec, pix_fmt, options = alpha_codec(
            self.path.suffix.lower(), preset, self.threads, info.width
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        stream: Any = self._container.add_stream(codec, rate=info.fps, options=options)
        self._stream = stream
        self._stream.width = info.width
        self._stream.height = info.height
        self._stream.pix_fmt = pix_fmt
        self._stream.codec_context.time_base = 1 / info.fps
        self._stream.thread_type = "AUTO"
        self._format = pix_fmt
        self._next = 0
        self.timer = timer or StageTimer()
        self._convert_pool = ThreadPoolExecutor(
            max(1, min(4, self.threads)), thread_name_prefix="convert"
        )
        # One thread: the encoder takes frames in order (it is multi-threaded itself).
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")

    def has(self, index: int) -> bool:
        return False

    def submit(self, index: int, frame: np.ndarray, alpha: np.ndarray) -> Future[None]:
        converted = self._convert_pool.submit(self._convert, frame, alpha)
        return self._encode_pool.submit(self._encode, index, converted)

    def _convert(self, frame: np.ndarray, alpha: np.ndarray) -> av.VideoFrame:
        with self.timer.timed("convert"):
            rgba = av.VideoFrame.from_ndarray(cutout_rgba(frame, alpha), format="rgba")
            return rgba.reformat(format=self._format)

    def _encode(self, index: int, converted: Future[av.VideoFrame]) -> None:
        if index != self._next:
            raise VideoError(f"frame {index} submitted out of order (expected {self._next})")
        frame = converted.result()
        with self.timer.timed("encode"):
            frame.pts = index
            frame.time_base = self._stream.codec_context.time_base
            self._container.mux(self._stream.encode(frame))
        self._next += 1

    def close(self) -> None:
        self._convert_pool.shutdown(wait=True)
        self._encode_pool.shutdown(wait=True)
        with self.timer.timed("encode"):
            self._container.mux(self._stream.encode(None))
        self._container.close()
