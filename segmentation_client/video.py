"""Video frames in (PyAV), RGBA frames out: a PNG sequence or a video with an alpha channel.

Outputs keep the input's frame count, order and frame rate. A PNG sequence is written one
file per frame, atomically (temporary name, then rename), so a file that exists is complete
and an interrupted run resumes where it stopped. Videos with alpha are WebM (VP9, ``yuva420p``)
or QuickTime (ProRes 4444, ``yuva444p10le``); MP4 has no widely supported alpha codec.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import numpy as np
from PIL import Image

from segmentation_client.wire import cutout_rgba

#: Container suffix -> (encoder, pixel format with alpha, encoder options).
ALPHA_CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    ".webm": ("libvpx-vp9", "yuva420p", {"crf": "30", "b:v": "0", "row-mt": "1"}),
    ".mov": ("prores_ks", "yuva444p10le", {"profile": "4444"}),
}
FRAME_PATTERN = "frame_{:06d}.png"
MANIFEST = "segment-video.json"
PNG_COMPRESS_LEVEL = 1


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
    """``frame_000000.png``... in ``directory``; writes run in a thread pool, in any order.

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
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_manifest(manifest, overwrite)
        self._pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))

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
        return self._pool.submit(self._write, index, cutout_rgba(frame, alpha))

    def _write(self, index: int, pixels: np.ndarray) -> None:
        final = self.path_of(index)
        partial = final.with_name(f".{final.name}.partial")
        Image.fromarray(pixels, mode="RGBA").save(
            partial, format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
        os.replace(partial, final)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class AlphaVideoWriter:
    """A video with alpha at the input's frame rate; frames are encoded in submission order."""

    def __init__(self, path: str | os.PathLike[str], info: VideoInfo) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in ALPHA_CODECS:
            raise VideoError(
                f"cannot write {self.path.name!r}: use a directory (PNG sequence), "
                f"{' or '.join(ALPHA_CODECS)} (video with alpha)"
            )
        codec, pix_fmt, options = ALPHA_CODECS[suffix]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        stream: Any = self._container.add_stream(codec, rate=info.fps, options=dict(options))
        self._stream = stream
        self._stream.width = info.width
        self._stream.height = info.height
        self._stream.pix_fmt = pix_fmt
        self._stream.codec_context.time_base = 1 / info.fps
        self._stream.thread_type = "AUTO"
        self._format = pix_fmt
        self._next = 0
        # One thread: the encoder needs frames in order (it is multi-threaded itself).
        self._pool = ThreadPoolExecutor(1)

    def has(self, index: int) -> bool:
        return False

    def submit(self, index: int, frame: np.ndarray, alpha: np.ndarray) -> Future[None]:
        return self._pool.submit(self._encode, index, cutout_rgba(frame, alpha))

    def _encode(self, index: int, pixels: np.ndarray) -> None:
        if index != self._next:
            raise VideoError(f"frame {index} submitted out of order (expected {self._next})")
        frame = av.VideoFrame.from_ndarray(pixels, format="rgba").reformat(format=self._format)
        frame.pts = index
        frame.time_base = self._stream.codec_context.time_base
        self._container.mux(self._stream.encode(frame))
        self._next += 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._container.mux(self._stream.encode(None))
        self._container.close()
