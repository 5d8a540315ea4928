"""Video frames in (PyAV), RGBA frames out: a PNG sequence or a video with an alpha channel
(or, composed on an opaque colour, RGB frames: PNGs or a video without one).

Outputs keep the input's frame count, order and timing: each output frame carries its source
frame's timestamp (a variable-frame-rate clip keeps every frame's time and its duration), and
a clip with a display matrix (a phone held upright) is turned upright before anything sees its
pixels, so the model segments it the way a player shows it and the output plays upright with
no rotation of its own. A PNG sequence is written one file per frame, durably (temporary
name, ``fsync``, then rename), and a frame file is trusted on resume only when it is whole,
so an interrupted run resumes where it stopped. Videos with alpha are WebM (VP9,
``yuva420p``) or QuickTime (ProRes 4444, ``yuva444p10le``), at any size, odd ones included;
MP4 has no widely supported alpha codec, so it is written (H.264) only for frames on an
opaque colour, which need no alpha; on such a colour WebM and QuickTime drop theirs too
(``yuv420p``, ``yuv444p10le``). Their YUV is BT.709 for HD (720 lines or 1280
columns and up) and BT.601 below, and tagged so, since players assume BT.709 for untagged HD.
Encoders use every core by default (see :data:`DEFAULT_ENCODE` for the measurements): at
libvpx's default effort VP9 with alpha ran at 2.4 frames/s on a 16-core H100 host, a
thirteenth of what the model does.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal

import av
import numpy as np
from PIL import Image

from segmentation_client.wire import Color, cutout_rgba, over_color

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
#: Container suffixes written only without alpha (frames on an opaque colour), and their codecs.
OPAQUE_CODECS: dict[str, str] = {".mp4": "H.264"}
# fmt: off
#: Suffixes of video and image files without an alpha video codec here: ``-o clip.mkv`` is
#: refused rather than taken for a directory (``clip.mp4`` too, unless the frames are
#: opaque). Any other name is a directory (``shots/a.frames``).
MEDIA_SUFFIXES = frozenset((
    ".mp4", ".m4v", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".flv", ".wmv",
    ".asf", ".ogv", ".3gp", ".3g2", ".mxf", ".y4m", ".ivf", ".nut", ".vob", ".dv", ".h264",
    ".h265", ".hevc", ".gif", ".apng", ".png", ".jpg", ".jpeg", ".webp", ".avif", ".tif",
    ".tiff", ".bmp",
))
# fmt: on
#: zlib level of PNG frames per preset (1: 4x the speed of Pillow's default 6, 10% larger).
#: ``fast`` frames go through FFmpeg's PNG encoder (see :class:`PngSequenceWriter`).
PNG_COMPRESS_LEVELS: dict[EncodePreset, int] = {"fast": 1, "balanced": 3, "small": 6}
PNG_COMPRESS_LEVEL = PNG_COMPRESS_LEVELS[DEFAULT_ENCODE]
FRAME_PATTERN = "frame_{:06d}.png"
MANIFEST = "segment-video.json"
#: Manifest keys that describe a run's results, not what it makes: never compared on resume.
MANIFEST_RECORDS = ("recorded", "timestamps")
#: Bytes of the input hashed into its identity (with its size): the container header and the
#: first packets, which differ between any two real clips (creation times, encoder data).
FINGERPRINT_BYTES = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def encode_threads() -> int:
    """Threads for the encoders: this process's cores (libvpx takes up to 64, zlib any)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(64, cores or 1))


#: libx264 ``preset`` and ``crf`` per ``--encode`` preset (``fast``: ``veryfast``, which keeps
#: up with the model on a few cores at 1080p, as VP9 at ``realtime`` does).
X264_SETTINGS: dict[EncodePreset, tuple[str, str]] = {
    "fast": ("veryfast", "20"),
    "balanced": ("medium", "20"),
    "small": ("slow", "23"),
}


def video_codec(
    suffix: str,
    preset: EncodePreset,
    threads: int,
    width: int,
    height: int = 2,
    *,
    alpha: bool = True,
) -> tuple[str, str, dict[str, str]]:
    """(encoder, pixel format, encoder options) for a ``suffix`` video, with an alpha
    channel unless ``alpha`` is False (frames on an opaque colour).

    VP9 (libvpx): ``deadline=realtime`` with ``cpu-used`` 8 (``fast``) or 6 (``balanced``),
    ``good``/2 for ``small``; ``row-mt`` plus as many tile columns as the width allows (one
    per 256 pixels, a power of two) let every thread work on one frame, since libvpx encodes
    frames one after another (and the alpha plane as a second stream). ProRes 4444 has no
    speed setting, but FFmpeg has two encoders: ``fast`` uses ``prores_aw`` (frames on
    ``threads``: 3.5x the speed of ``prores_ks`` on 2 cores at 1080p, files 26% smaller on
    noise), ``balanced`` ``prores_ks`` (finer rate control, slices on ``threads``), ``small``
    ``prores_ks`` with the LT quantiser matrix (17% smaller on a 320x240 test clip, softer
    detail). ``prores_aw`` cannot open at an odd width or height, so such frames take
    ``prores_ks`` at every preset. Each keeps alpha within one level of 255, except that at
    a width that is not a multiple of 16 both ProRes encoders of FFmpeg 8 sometimes write
    alpha blocks of the wrong level (seen at 65, 66 and 72 pixels, never at 64, 80 or 1280;
    it varies from one encode to the next): such clips are written as QuickTime Animation
    (``qtrle``, lossless ARGB, read by the same editors), larger but exact.

    Without alpha, VP9 is ``yuv420p``, ProRes 4444 ``yuv444p10le`` (its alpha-block fault
    does not arise, so only odd sizes take ``prores_ks``) and ``.mp4`` is H.264 ``yuv420p``
    (:data:`X264_SETTINGS`), which needs an even width and height.
    """
    if not alpha and suffix == ".mp4":
        if width % 2 or height % 2:
            raise VideoError(
                f"H.264 in MP4 needs an even width and height, not {width}x{height}: "
                "write a .webm or .mov instead"
            )
        speed, crf = X264_SETTINGS[preset]
        return "libx264", "yuv420p", {"preset": speed, "crf": crf, "threads": str(threads)}
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
        return "libvpx-vp9", "yuva420p" if alpha else "yuv420p", options
    if suffix == ".mov":
        if width % 16 and alpha:
            return "qtrle", "argb", {}
        pix_fmt = "yuva444p10le" if alpha else "yuv444p10le"
        if preset == "fast" and width % 2 == 0 and height % 2 == 0:
            return "prores_aw", pix_fmt, {"profile": "4", "threads": str(threads)}
        options = {"profile": "4444", "threads": str(threads)}
        if preset == "small":
            options["quant_mat"] = "lt"
        return "prores_ks", pix_fmt, options
    raise VideoError(
        f"cannot write a {suffix or 'suffix-less'} video: use a directory (PNG sequence), "
        f"{' or '.join(ALPHA_CODECS)} (video with alpha)"
        + ("" if alpha else f", or {' or '.join(OPAQUE_CODECS)} (on an opaque colour)")
    )


@dataclass(frozen=True)
class ColourTags:
    """How RGB becomes YUV in an output video, and the tags that tell players so.

    BT.709 from 720 lines or 1280 columns up, BT.601 (SMPTE 170M) below: what players
    assume for untagged video of each size, so even a player that ignores tags shows the
    right colours; limited ("MPEG") range, which every YUV codec here stores.
    """

    name: str
    #: swscale matrix (``VideoFrame.reformat(dst_colorspace=...)``).
    matrix: str
    #: FFmpeg's AVColorPrimaries, AVColorTransferCharacteristic and AVColorSpace values.
    primaries: int
    transfer: int
    colorspace: int

    @staticmethod
    def for_size(width: int, height: int) -> ColourTags:
        if height >= 720 or width >= 1280:
            return ColourTags("bt709", "ITU709", primaries=1, transfer=1, colorspace=1)
        return ColourTags("bt601", "ITU601", primaries=6, transfer=6, colorspace=6)


#: AVCOL_SPC_UNSPECIFIED: a frame that does not say which matrix made its YUV.
_UNSPECIFIED_COLORSPACE = 2


def check_encoder(
    codec: str, pix_fmt: str, width: int, height: int, options: dict[str, str]
) -> None:
    """Open ``codec`` at this size and format, so a frame size the encoder refuses is found
    before the model is built, not after the first batch."""
    try:
        context: Any = av.CodecContext.create(codec, "w")
        context.width, context.height, context.pix_fmt = width, height, pix_fmt
        context.time_base = Fraction(1, 25)
        context.options = {k: v for k, v in options.items() if k != "threads"}
        context.open()
    except (av.FFmpegError, ValueError) as exc:
        raise VideoError(
            f"the {codec} encoder cannot write {width}x{height} {pix_fmt} frames: {_reason(exc)}"
        ) from None


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
class Orientation:
    """How to turn decoded frames upright, from the stream's display matrix.

    ``rotation`` is clockwise degrees (0, 90, 180, 270) and ``mirrored`` a left-right flip
    after it; FFmpeg's own ``-autorotate`` rules decide, down to the rounding of a matrix
    that is not a multiple of 90 degrees (taken to the nearest).
    """

    rotation: int = 0
    mirrored: bool = False

    @staticmethod
    def of(frame: Any) -> Orientation:
        matrix = next(
            (bytes(d) for d in frame.side_data if getattr(d.type, "name", "") == "DISPLAYMATRIX"),
            None,
        )
        if matrix is None or len(matrix) < 36:
            return Orientation()
        m = struct.unpack("<9i", matrix[:36])
        # FFmpeg's get_rotation(): theta = -av_display_rotation_get(), in [0, 360).
        if not math.hypot(m[0], m[3]) or not math.hypot(m[1], m[4]):
            return Orientation()
        theta = math.degrees(
            math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3]))
        )
        theta = round(theta) % 360
        quarter = round(theta / 90) % 4 * 90
        if quarter == 90:  # transpose=clock, or cclock_flip when m[3] > 0
            return Orientation(90, mirrored=m[3] > 0)
        if quarter == 270:  # transpose=cclock, or clock_flip when m[3] < 0
            return Orientation(270, mirrored=m[3] < 0)
        hflip, vflip = (m[0] < 0, m[4] < 0) if quarter == 180 else (False, m[4] < 0)
        if hflip and vflip:
            return Orientation(180)
        if vflip:  # a vertical flip is a half turn then a left-right flip
            return Orientation(180, mirrored=True)
        return Orientation(0, mirrored=hflip)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        if not self.rotation and not self.mirrored:
            return pixels
        turned = np.rot90(pixels, k=-self.rotation // 90)
        if self.mirrored:
            turned = turned[:, ::-1]
        return np.ascontiguousarray(turned)

    def describe(self) -> str:
        parts = [f"rotated {self.rotation} degrees clockwise"] if self.rotation else []
        return ", ".join([*parts, *(["mirrored"] if self.mirrored else [])]) or "upright"


@dataclass
class FrameTimes:
    """Presentation timestamps of the frames decoded so far, in the stream's ``time_base``.

    Appended by the reader as it decodes; a writer reads frame ``i``'s time once frame ``i``
    was handed out, which is always after it was appended. Timestamps are made strictly
    increasing (a missing or repeated one follows the previous by its frame interval, or by
    one tick) so any muxer takes them.
    """

    time_base: Fraction
    fps: Fraction
    pts: list[int] = field(default_factory=list)
    #: The last frame's own duration (its packet's), used for the very last frame only.
    last_duration: int | None = None

    def add(self, pts: int | None, duration: int | None) -> None:
        step = max(1, round(1 / (self.fps * self.time_base)))
        if pts is None:
            pts = self.pts[-1] + step if self.pts else 0
        elif self.pts and pts <= self.pts[-1]:
            pts = self.pts[-1] + 1
        self.pts.append(int(pts))
        self.last_duration = duration if duration and duration > 0 else None

    def duration_of(self, index: int) -> int:
        """Ticks until the next frame (the last frame: its own duration, or the interval
        before it, or one frame at the average rate)."""
        if index + 1 < len(self.pts):
            return self.pts[index + 1] - self.pts[index]
        if self.last_duration:
            return self.last_duration
        if len(self.pts) > 1:
            return self.pts[-1] - self.pts[-2]
        return max(1, round(1 / (self.fps * self.time_base)))

    def relative(self, index: int) -> int:
        """Frame ``index``'s timestamp counted from the first frame (outputs start at 0)."""
        return self.pts[index] - self.pts[0]

    def seconds(self, index: int) -> float:
        return float(self.relative(index) * self.time_base)

    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one."""
        if not self.pts:
            return 0.0
        last = len(self.pts) - 1
        return float((self.relative(last) + self.duration_of(last)) * self.time_base)

    def as_manifest(self) -> dict[str, Any]:
        return {
            "time_base": str(self.time_base),
            "start_pts": self.pts[0] if self.pts else 0,
            "pts": [self.relative(i) for i in range(len(self.pts))],
            "times": [round(self.seconds(i), 6) for i in range(len(self.pts))],
            "duration": round(self.duration(), 6),
        }


@dataclass(frozen=True)
class VideoInfo:
    #: Frame size as the frames come out of the reader: upright.
    width: int
    height: int
    #: Average frame rate (the frame times themselves are in :class:`FrameTimes`).
    fps: Fraction
    #: Frame count from the container header; None when it does not say.
    frames: int | None
    codec: str
    time_base: Fraction = Fraction(1, 1000)
    orientation: Orientation = Orientation()


class VideoReader:
    """Decoded uint8 RGB frames of the first video stream, upright, in presentation order.

    The first frame is decoded on opening: its size, display matrix and colour tags are
    what a broken or unsupported input is judged by, before any model is built. ``times``
    collects each frame's timestamp as it is handed out.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> None:
        self.path = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<stream>")
        try:
            self._container: Any = av.open(source)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot read {self.path!r}: {_reason(exc)}") from None
        try:
            self._open()
        except BaseException:
            self._container.close()
            raise

    def _open(self) -> None:
        if not self._container.streams.video:
            raise VideoError(f"{self.path!r} has no video stream")
        self._stream: Any = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        if not rate:
            raise VideoError(f"{self.path!r}: the video stream has no frame rate")
        time_base = self._stream.time_base or 1 / Fraction(rate)
        self._frames = self._decode()
        self._first = next(self._frames, None)
        if self._first is None:
            raise VideoError(f"{self.path!r}: the video stream has no frames")
        orientation = Orientation.of(self._first)
        upright = orientation.rotation in (90, 270)
        width, height = self._first.width, self._first.height
        self.times = FrameTimes(Fraction(time_base), Fraction(rate))
        self.info = VideoInfo(
            width=height if upright else width,
            height=width if upright else height,
            fps=Fraction(rate),
            frames=self._stream.frames or None,
            codec=self._stream.codec_context.name,
            time_base=Fraction(time_base),
            orientation=orientation,
        )
        # Untagged HD is BT.709 to every player; swscale alone would take BT.601.
        hd = ColourTags.for_size(width, height).name == "bt709"
        self._source_matrix = (
            "ITU709"
            if hd
            and self._first.colorspace == _UNSPECIFIED_COLORSPACE
            and not self._first.format.name.startswith(("rgb", "bgr", "gbr", "pal", "gray"))
            else None
        )

    def _decode(self) -> Iterator[Any]:
        try:
            yield from self._container.decode(self._stream)
        except av.FFmpegError as exc:
            raise VideoError(f"cannot decode {self.path!r}: {_reason(exc)}") from None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is None:
            raise VideoError(f"{self.path!r}: frames can be read once")
        frame, self._first = self._first, None
        while frame is not None:
            self.times.add(frame.pts, getattr(frame, "duration", None))
            if self._source_matrix:
                pixels = frame.reformat(format="rgb24", src_colorspace=self._source_matrix)
                pixels = pixels.to_ndarray()
            else:
                pixels = frame.to_ndarray(format="rgb24")
            yield self.info.orientation.apply(pixels)
            frame = next(self._frames, None)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies an input file: its path, size, modification time and a SHA-256 of its
    first MiB (container header and first packets). An input that is not a local file (a URL
    FFmpeg reads) is known by its name only."""
    if not os.path.isfile(path):
        return {"path": os.fspath(path), "size": None, "mtime_ns": None, "sha256_first_mib": None}
    try:
        stat = os.stat(path)
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read(FINGERPRINT_BYTES)).hexdigest()
    except OSError as exc:
        raise VideoError(f"cannot read {os.fspath(path)!r}: {_reason(exc)}") from None
    return {
        "path": os.path.abspath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_first_mib": digest,
    }


OutputKind = Literal["png", ".webm", ".mov", ".mp4"]


def output_kind(output: str, *, opaque: bool = False) -> OutputKind:
    """What ``-o output`` names: a ``.webm`` / ``.mov`` video (``.mp4`` too when the frames
    are ``opaque``: composed on an opaque colour), or a directory of PNGs.

    A path ending in a separator, or an existing directory whose name is not a video's, is a
    directory whatever dots its name holds; a name ending in another video or image suffix
    (``.mkv``, ``.png``...) is refused, since this tool cannot write it.
    """
    path = Path(output)
    if output.endswith((os.sep, "/")):
        return "png"
    suffix = path.suffix.lower()
    if suffix in ALPHA_CODECS:
        return ".webm" if suffix == ".webm" else ".mov"
    if opaque and suffix in OPAQUE_CODECS:
        return ".mp4"
    if suffix in MEDIA_SUFFIXES and not path.is_dir():
        files = " / ".join([*ALPHA_CODECS, *(OPAQUE_CODECS if opaque else ())])
        why = (
            "MP4 has no alpha channel (an opaque --bg-color needs none): "
            if suffix in OPAQUE_CODECS
            else ""
        )
        raise VideoError(
            f"cannot write {path.name!r}: {why}use a directory (PNG sequence) or a {files} file"
        )
    return "png"


def check_writable_file(path: str | os.PathLike[str], what: str, overwrite: bool = True) -> None:
    """Raise :class:`VideoError` unless ``path`` can be created (or replaced) as a file.

    Creates missing parent directories and a probe file (removed again), so a read-only
    mount, a parent that is a file or a missing permission shows now, as one line.
    """
    target = Path(path)
    if target.is_dir():
        raise VideoError(f"cannot write the {what} {os.fspath(path)!r}: it is a directory")
    if target.exists() and not overwrite:
        raise VideoError(f"{os.fspath(path)} exists; pass --overwrite to replace it")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab"):
            pass
        if not existed:
            target.unlink()
    except OSError as exc:
        raise VideoError(f"cannot write the {what} {os.fspath(path)!r}: {_reason(exc)}") from None


def check_writable_directory(path: str | os.PathLike[str], what: str = "output") -> None:
    """Raise :class:`VideoError` unless ``path`` is (or can be made) a directory we can write."""
    directory = Path(path)
    try:
        if directory.exists() and not directory.is_dir():
            raise VideoError(
                f"cannot write the {what} {os.fspath(path)!r}: it is a file, not a directory"
            )
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-check-{os.getpid()}"
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise VideoError(f"cannot write the {what} {os.fspath(path)!r}: {_reason(exc)}") from None


def png_is_complete(path: Path, width: int | None = None, height: int | None = None) -> bool:
    """Whether ``path`` is a whole PNG (signature, header of the expected size, end chunk)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
            handle.seek(-len(_PNG_END), os.SEEK_END)
            tail = handle.read(len(_PNG_END))
    except OSError:  # missing, or shorter than the end chunk
        return False
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return False
    if width is not None and struct.unpack(">II", head[16:24]) != (width, height):
        return False
    return tail == _PNG_END


def _write_durably(path: Path, data: bytes) -> None:
    """``data`` at ``path``: a temporary file, flushed to disk, then renamed over it."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _sync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (where the platform can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def frame_pixels(
    frame: np.ndarray, matte: np.ndarray, background: Color | None = None
) -> np.ndarray:
    """One output frame's pixels from its RGB ``frame`` and ``matte``: an ``HxW`` alpha (the
    frame's pixels under it, as :func:`cutout_rgba` makes them) or an ``HxWx4`` cutout taken
    as it is (edge colours refined); laid over ``background`` when given (``HxWx3`` RGB when
    the colour is opaque, see :func:`over_color`)."""
    if matte.shape[:2] != frame.shape[:2]:
        raise ValueError(f"matte {matte.shape} does not match frame {frame.shape[:2]}")
    rgba = matte if matte.ndim == 3 else cutout_rgba(frame, matte)
    return rgba if background is None else over_color(rgba, background)


def _differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    def show(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 80 else text[:77] + "..."

    lines = []
    for key in sorted(set(previous) | set(current)):
        if key in MANIFEST_RECORDS or previous.get(key) == current.get(key):
            continue
        if isinstance(previous.get(key), dict) and isinstance(current.get(key), dict):
            inner = _differences(previous[key], current[key])
            lines += [line.replace("different ", f"different {key} ", 1) for line in inner]
        else:
            lines.append(
                f"different {key} ({show(previous.get(key, '(none)'))} then, "
                f"{show(current.get(key, '(none)'))} now)"
            )
    return lines


class PngSequenceWriter:
    """``frame_000000.png``... in ``directory``, encoded by a pool of threads, in any order.

    Both encoders release the interpreter lock: two threads wrote 1080p cutouts 1.75x as fast
    as one on a 2-core machine, so ``threads`` defaults to the cores. ``fast`` uses FFmpeg's
    PNG encoder with the ``sub`` row filter at zlib level 1 (23 ms a 1080p cutout against
    Pillow's 62 at the same level, 1% larger: Pillow tries every filter on every row);
    ``balanced`` and ``small`` use Pillow at zlib levels 3 and 6. Each frame's cutout is
    composed in its worker too, off the caller's event loop (:func:`frame_pixels`: on
    ``background`` when given, RGB PNGs when it is opaque).

    ``directory/segment-video.json`` records what the frames are: the input's identity and
    every option that changes a frame's pixels (``manifest``), beside ``recorded`` facts
    that are not compared. Resuming into a directory made by another job is refused, naming
    each difference, unless ``overwrite`` (which starts over). Each frame file is flushed to
    disk before it takes its name, and a file left incomplete (empty, truncated, another
    size) is written again. ``close`` adds each frame's timestamp (``times``, filled by the
    reader) to the manifest.
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
        times: FrameTimes | None = None,
        recorded: dict[str, Any] | None = None,
        background: Color | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.background = background
        check_writable_directory(self.directory)
        self._manifest = {**manifest, "recorded": recorded or {}}
        self._size = (manifest.get("width"), manifest.get("height"))
        self._check_manifest(manifest, overwrite)
        self.times = times
        self.threads = threads or encode_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png")
        self._level = PNG_COMPRESS_LEVELS[preset]
        self._fast = preset == "fast"
        self._encoders = threading.local()  # one FFmpeg PNG encoder per worker thread
        self.timer = timer or StageTimer()
        #: Frame files found incomplete on resume, written again.
        self.repaired = 0

    def _check_manifest(self, manifest: dict[str, Any], overwrite: bool) -> None:
        path = self.directory / MANIFEST
        try:
            if path.exists() and not overwrite:
                try:
                    previous = json.loads(path.read_text())
                except ValueError:
                    previous = {"manifest": "unreadable"}
                changed = _differences(previous, manifest)
                if changed:
                    raise VideoError(
                        f"{self.directory} holds frames of another job: "
                        + "; ".join(changed)
                        + "; pass --overwrite to start over"
                    )
            elif not path.exists() and not overwrite and any(self.directory.glob("frame_*.png")):
                raise VideoError(
                    f"{self.directory} holds frame files but no {MANIFEST} to tell what made "
                    "them; pass --overwrite to start over"
                )
            if overwrite:
                for old in self.directory.glob("frame_*.png"):
                    old.unlink()
            for stale in self.directory.glob(".frame_*.png.partial"):
                stale.unlink()
            self._write_manifest()
        except OSError as exc:
            raise VideoError(f"cannot write {self.directory}: {_reason(exc)}") from None

    def _write_manifest(self) -> None:
        _write_durably(self.directory / MANIFEST, json.dumps(self._manifest, indent=2).encode())
        _sync_directory(self.directory)

    def path_of(self, index: int) -> Path:
        return self.directory / FRAME_PATTERN.format(index)

    def has(self, index: int) -> bool:
        """Whether frame ``index`` was written whole by an earlier run of the same job."""
        path = self.path_of(index)
        if not path.exists():
            return False
        width, height = self._size
        if png_is_complete(path, width, height):
            return True
        self.repaired += 1
        return False

    def submit(self, index: int, frame: np.ndarray, matte: np.ndarray) -> Future[None]:
        """Write frame ``index``; ``matte`` as :func:`frame_pixels` takes it."""
        return self._pool.submit(self._write, index, frame, matte)

    def _write(self, index: int, frame: np.ndarray, matte: np.ndarray) -> None:
        with self.timer.timed("encode"):
            pixels = frame_pixels(frame, matte, self.background)
            if self._fast:
                data = self._encode_png(pixels)
            else:
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG", compress_level=self._level)
                data = buffer.getvalue()
            _write_durably(self.path_of(index), data)

    def _encode_png(self, pixels: np.ndarray) -> bytes:
        """One PNG file's bytes (RGBA, or RGB for ``HxWx3`` pixels) from FFmpeg's encoder
        (this thread's, made for this size and format)."""
        height, width, channels = pixels.shape
        pix_fmt = "rgba" if channels == 4 else "rgb24"
        encoder: Any = getattr(self._encoders, "png", None)
        if encoder is None or (encoder.width, encoder.height, encoder.pix_fmt) != (
            width,
            height,
            pix_fmt,
        ):
            encoder = av.CodecContext.create("png", "w")
            encoder.width, encoder.height, encoder.pix_fmt = width, height, pix_fmt
            encoder.time_base = Fraction(1, 1)
            encoder.thread_count = 1  # frames run in parallel on the pool's threads instead
            encoder.options = {"pred": "sub", "compression_level": str(self._level)}
            self._encoders.png = encoder
        packets = encoder.encode(av.VideoFrame.from_ndarray(pixels, format=pix_fmt))
        return b"".join(bytes(packet) for packet in packets)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.times is not None and self.times.pts:
            self._manifest["timestamps"] = self.times.as_manifest()
            self._write_manifest()
        else:
            _sync_directory(self.directory)


class AlphaVideoWriter:
    """A video with alpha, each frame at its source frame's timestamp, in submission order.

    Two stages so that neither waits for the other: a pool of threads composes each cutout
    (:func:`frame_pixels`) and converts it to the encoder's pixel format (swscale, 10-20 ms
    a 1080p frame, without the interpreter lock), and one thread feeds the converted frames
    to the encoder in index order (the encoder itself runs on ``threads``; see
    :func:`video_codec`). On an opaque ``background`` the video has no alpha channel (and
    may be an ``.mp4``); on a translucent one it keeps it.

    Timestamps come from ``times`` (the reader's) in the source stream's time base, counted
    from the first frame; without it, frame ``i`` is at ``i / info.fps``. Each packet's
    duration is the gap to the next frame (the last keeps its source duration), so a
    variable-frame-rate clip keeps its length. WebM stores milliseconds: times there are
    rounded to the millisecond.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        info: VideoInfo,
        *,
        preset: EncodePreset = DEFAULT_ENCODE,
        threads: int | None = None,
        timer: StageTimer | None = None,
        times: FrameTimes | None = None,
        background: Color | None = None,
    ) -> None:
        self.path = Path(path)
        self.threads = threads or encode_threads()
        self.background = background
        #: Whether the frames keep an alpha channel (no opaque background).
        self.alpha = background is None or background[3] < 255
        codec, pix_fmt, options = video_codec(
            self.path.suffix.lower(),
            preset,
            self.threads,
            info.width,
            info.height,
            alpha=self.alpha,
        )
        check_encoder(codec, pix_fmt, info.width, info.height, options)
        self.codec = codec
        self.colour = ColourTags.for_size(info.width, info.height)
        self.times = times
        time_base = times.time_base if times is not None else 1 / info.fps
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot write {os.fspath(self.path)!r}: {_reason(exc)}") from None
        stream: Any = self._container.add_stream(codec, rate=info.fps, options=options)
        self._stream = stream
        self._stream.width = info.width
        self._stream.height = info.height
        self._stream.pix_fmt = pix_fmt
        self._stream.time_base = time_base
        context = self._stream.codec_context
        context.time_base = time_base
        context.color_primaries = self.colour.primaries
        context.color_trc = self.colour.transfer
        #: RGB codecs (qtrle) take the pixels as they are: no YUV matrix, full range.
        self._rgb = pix_fmt in ("argb", "rgba")
        context.colorspace = 0 if self._rgb else self.colour.colorspace  # 0: AVCOL_SPC_RGB
        context.color_range = 2 if self._rgb else 1  # full ("JPEG") RGB, limited YUV
        self._stream.thread_type = "AUTO"
        self._format = pix_fmt
        self._next = 0
        self._held: Any = None  # the last packet, muxed once the next one gives its duration
        self.timer = timer or StageTimer()
        self._convert_pool = ThreadPoolExecutor(
            max(1, min(4, self.threads)), thread_name_prefix="convert"
        )
        # One thread: the encoder takes frames in order (it is multi-threaded itself).
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")

    def has(self, index: int) -> bool:
        return False

    def submit(self, index: int, frame: np.ndarray, matte: np.ndarray) -> Future[None]:
        """Encode frame ``index`` (in order); ``matte`` as :func:`frame_pixels` takes it."""
        converted = self._convert_pool.submit(self._convert, frame, matte)
        return self._encode_pool.submit(self._encode, index, converted)

    def _convert(self, frame: np.ndarray, matte: np.ndarray) -> av.VideoFrame:
        with self.timer.timed("convert"):
            pixels = frame_pixels(frame, matte, self.background)
            picture = av.VideoFrame.from_ndarray(
                pixels, format="rgba" if pixels.shape[2] == 4 else "rgb24"
            )
            if self._rgb:
                return picture.reformat(format=self._format)
            return picture.reformat(
                format=self._format, dst_colorspace=self.colour.matrix, dst_color_range="MPEG"
            )

    def _encode(self, index: int, converted: Future[av.VideoFrame]) -> None:
        if index != self._next:
            raise VideoError(f"frame {index} submitted out of order (expected {self._next})")
        frame = converted.result()
        with self.timer.timed("encode"):
            frame.pts = self.times.relative(index) if self.times is not None else index
            frame.time_base = self._stream.codec_context.time_base
            self._mux(self._stream.encode(frame))
        self._next += 1

    def _mux(self, packets: list[Any]) -> None:
        for packet in packets:
            if self._held is not None:
                self._held.duration = max(1, packet.pts - self._held.pts)
                self._container.mux(self._held)
            self._held = packet

    def _last_duration(self) -> int:
        if self.times is not None and self.times.pts:
            return self.times.duration_of(len(self.times.pts) - 1)
        return 1

    def close(self) -> None:
        self._convert_pool.shutdown(wait=True)
        self._encode_pool.shutdown(wait=True)
        with self.timer.timed("encode"):
            self._mux(self._stream.encode(None))
            if self._held is not None:
                self._held.duration = self._last_duration()
                self._container.mux(self._held)
                self._held = None
        self._container.close()
