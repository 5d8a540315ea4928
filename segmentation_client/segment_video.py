"""``segment-video``: cut every frame of a video out of its background.

    segment-video INPUT -o OUTPUT [--model rmbg|yolo] [--server URL] [--encode fast|balanced|small]
                  [--refine] [--bg-color COLOUR]

OUTPUT is a directory (RGBA PNG sequence ``frame_000000.png``..., resumable; any name, dots
included, or a path ending in ``/``) or a ``.webm`` (VP9 with alpha) / ``.mov`` (ProRes 4444)
file. Every output frame keeps its source frame's timestamp (videos carry them, a PNG
sequence's ``segment-video.json`` lists them), and a clip with a display matrix (a phone held
upright) is segmented and written upright. With ``--server`` the frames go to a running
service (bounded concurrency, retries on 503/429); without it the segmentor runs in this
process, on the GPU when there is one, configured by the same environment variables as the
service. ``--model rmbg`` keeps RMBG-2.0's alpha matte; ``--model yolo`` keeps the pixels of
the objects YOLO11-seg finds (the union of their instance masks). Audio is not copied.

``--refine`` (rmbg) estimates the foreground's own colour at the matte's soft edges, so the
old background does not show through as a fringe: through ``--server`` the service does (its
``refine``), in-process the model's device does. ``--bg-color`` lays each cutout over a
colour, here, as the service's ``background`` does (within one level); an opaque colour
gives frames without alpha: RGB PNGs, VP9 / ProRes without an alpha channel, or an ``.mp4``
(H.264). ``--crop`` is refused: every frame of a video, and of a PNG sequence an editor
imports as footage, has one size.

Decoding, the model and encoding run at the same time (a decode thread, one model thread, a
pool of encoder threads, bounded queues between them, frame order kept), so the slowest of
them sets the pace. Every run ends with a summary: frames/s and the time to the first frame
written; ``--profile-startup`` adds where the first seconds went (imports, model build,
first batch) and each stage's busy seconds; ``--report FILE`` writes them as JSON.

Every path the run writes (OUTPUT, ``--report``) and the encoder at the clip's frame size are
checked before the model is built. Exit status: 0 done, 1 the frames could not be segmented
(service error, model error), 2 bad arguments, unreadable input or unwritable output (one
line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm import tqdm

from segmentation_client.video import (
    DEFAULT_ENCODE,
    ENCODE_PRESETS,
    AlphaVideoWriter,
    EncodePreset,
    PngSequenceWriter,
    StageTimer,
    VideoError,
    VideoReader,
    check_writable_file,
    fingerprint,
    output_kind,
)
from segmentation_client.wire import Color, parse_color

ModelKind = Literal["rmbg", "yolo"]
MODEL_KINDS: tuple[ModelKind, ...] = ("rmbg", "yolo")

#: Most frame writes (PNG encodes) waiting at once; bounds the memory held by decoded frames.
MAX_PENDING_WRITES = 32
#: Decoded frames the decode thread may hold ahead of the model (a 1080p frame is 6 MiB).
DECODE_AHEAD = 32
#: Clips shorter than this (or of unknown length) run the in-process model with quick-start
#: attention: 0.7 s less for the first batch, 2.3% more for each later one (RMBG-2.0, 1080p,
#: batch 16, H200; see LocalRunner); they cross at about this many frames.
QUICK_START_FRAMES = 1400


class MatteSource(Protocol):
    """Turns frames into alpha mattes (``HxW``), or into cutouts (``HxWx4``, edge colours
    refined) that the writer takes as they are; ``chunk`` frames per call, ``window`` calls
    in flight."""

    chunk: int
    window: int

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]: ...


class Writer(Protocol):
    def has(self, index: int) -> bool: ...

    def submit(self, index: int, frame: np.ndarray, matte: np.ndarray) -> Future[None]: ...

    def close(self) -> None: ...


def with_refined_edges(frame: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """The service's refined cutout of ``frame`` (``HxWx4``) with the frame's own pixels
    where it is opaque: the service refined the JPEG it was sent, whose colours are within
    a few levels of the frame's, and only the soft edges (0 < alpha < 255) carry estimated
    colours; elsewhere the output is the plain cutout's, to the level."""
    if refined.shape != (*frame.shape[:2], 4):
        raise ValueError(f"the refined cutout is {refined.shape}, not {frame.shape[:2]} RGBA")
    cutout = np.array(refined)  # decoded images are read-only
    np.copyto(cutout[..., :3], frame, where=cutout[..., 3:] == 255)
    return cutout


@dataclass
class ServiceMattes:
    """Mattes from a running service: one request per frame, ``window`` in flight; with
    ``refine``, RGBA cutouts whose edge colours the service estimated."""

    client: Any  # AsyncSegmentorClient
    model: ModelKind
    detect: dict[str, Any] = field(default_factory=dict)
    chunk: int = 1
    window: int = 16
    refine: bool = False

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        async def one(frame: np.ndarray) -> np.ndarray:
            if self.model == "rmbg" and self.refine:
                answer = await self.client.remove_background(frame, output="rgba", refine=True)
                return await asyncio.to_thread(lambda: with_refined_edges(frame, answer.to_array()))
            if self.model == "rmbg":
                matte = await self.client.remove_background(frame, output="mask")
                return await asyncio.to_thread(matte.alpha)
            found = await self.client.segment(frame, **self.detect)
            return await asyncio.to_thread(found.union_mask)

        return list(await asyncio.gather(*(one(f) for f in frames)))


@dataclass
class LocalMattes:
    """Mattes from a segmentor in this process, ``chunk`` frames per batch (OOM-safe).

    Batches run one at a time on a thread of their own (``window`` of them queued), so the
    next batch is ready the moment the GPU finishes one. ``timer`` gets the model's busy
    seconds; ``first_call`` the seconds of the first batch (cuDNN plans, lazy loading).
    """

    runner: Any  # LocalRunner
    chunk: int = 8
    window: int = 2
    timer: StageTimer = field(default_factory=StageTimer)
    first_call: float | None = None
    _thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="model"), repr=False
    )

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        future = self._thread.submit(self._run, frames)
        return await asyncio.wrap_future(future)

    def _run(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        started = time.perf_counter()
        outputs = self.runner(frames)
        elapsed = time.perf_counter() - started
        self.timer.add("model", elapsed)
        if self.first_call is None:
            self.first_call = elapsed
        return [o.cutout if o.cutout is not None else o.alpha for o in outputs]

    async def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


@dataclass
class SegmentStats:
    """What :func:`segment_frames` did; times are ``time.perf_counter()`` values."""

    processed: int = 0
    skipped: int = 0
    first_written: float | None = None
    #: When the first batch's mattes came back, and how many frames it held.
    first_batch_at: float | None = None
    first_batch_frames: int = 0


class _DecodeFailed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class DecodeAhead:
    """Frames of ``frames`` decoded on a thread of their own, at most ``depth`` ahead, in order.

    The thread stops when the consumer closes it (its ``put`` waits at most 0.1 s at a time),
    so the reader is never used after its caller closes it.
    """

    def __init__(self, frames: Iterator[np.ndarray], depth: int, timer: StageTimer) -> None:
        self._frames = frames
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stop = threading.Event()
        self._timer = timer
        self._thread = threading.Thread(target=self._produce, name="decode", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        item: object
        while True:
            try:
                with self._timer.timed("decode"):
                    item = next(self._frames, _DONE)
            except BaseException as exc:
                item = _DecodeFailed(exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _DONE or isinstance(item, _DecodeFailed) or self._stop.is_set():
                return

    async def next(self) -> np.ndarray | None:
        """The next frame, or None after the last."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            item = await asyncio.to_thread(self._queue.get)
        if isinstance(item, _DecodeFailed):
            raise item.error
        if item is _DONE:
            return None
        assert isinstance(item, np.ndarray)
        return item

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)


async def segment_frames(
    frames: Iterator[np.ndarray],
    source: MatteSource,
    writer: Writer,
    progress: Callable[[int], Any] = lambda n: None,
    timer: StageTimer | None = None,
) -> SegmentStats:
    """Matte and write every frame in order; frames the writer already has are skipped.

    Frames are decoded up to ``DECODE_AHEAD`` ahead on a thread, up to ``source.window``
    calls are in flight and up to ``MAX_PENDING_WRITES`` writes are pending, so memory stays
    bounded however long the video and each stage works while the others do. ``timer``
    gets the decode thread's busy seconds.
    """
    in_flight: deque[tuple[list[int], list[np.ndarray], Awaitable[list[np.ndarray]]]] = deque()
    writes: deque[Future[None]] = deque()
    stats = SegmentStats()

    def first_written(_: Future[None]) -> None:
        if stats.first_written is None:
            stats.first_written = time.perf_counter()

    async def settle_oldest() -> None:
        indices, batch, call = in_flight.popleft()
        mattes = await call
        for index, frame, alpha in zip(indices, batch, mattes, strict=True):
            write = writer.submit(index, frame, alpha)
            if stats.first_written is None:
                write.add_done_callback(first_written)
            writes.append(write)
            while len(writes) > MAX_PENDING_WRITES:
                await asyncio.wrap_future(writes.popleft())
        stats.processed += len(indices)
        progress(len(indices))

    def dispatch(indices: list[int], batch: list[np.ndarray]) -> None:
        call = asyncio.ensure_future(source.mattes(batch))
        if not stats.first_batch_frames:
            stats.first_batch_frames = len(batch)

            def first_batch_done(_: asyncio.Future[list[np.ndarray]]) -> None:
                stats.first_batch_at = time.perf_counter()

            call.add_done_callback(first_batch_done)
        in_flight.append((indices, batch, call))

    indices: list[int] = []
    batch: list[np.ndarray] = []
    index = 0
    decoded = DecodeAhead(frames, DECODE_AHEAD, timer or StageTimer())
    try:
        while (frame := await decoded.next()) is not None:
            if writer.has(index):
                stats.skipped += 1
                progress(1)
            else:
                indices.append(index)
                batch.append(frame)
                if len(batch) == source.chunk:
                    dispatch(indices, batch)
                    indices, batch = [], []
                while len(in_flight) >= source.window:
                    await settle_oldest()
            index += 1
        if batch:
            dispatch(indices, batch)
        while in_flight:
            await settle_oldest()
        while writes:
            await asyncio.wrap_future(writes.popleft())
    finally:
        await decoded.close()
        for _, _, call in in_flight:
            if isinstance(call, asyncio.Future):
                call.cancel()
    return stats


@dataclass
class RunReport:
    """One run, as the final summary and ``--report`` show it (seconds unless named)."""

    input: str
    output: str
    model: str
    mode: str
    encode: str
    frames: int
    skipped: int
    width: int
    height: int
    #: How the frames were turned upright (the input's display matrix), e.g. "rotated 90
    #: degrees clockwise"; "upright" when they needed nothing.
    orientation: str
    #: Seconds from the input's first frame to the end of its last one (its timestamps).
    duration: float
    seconds: float
    frames_per_s: float
    #: From process start to the first output frame written.
    time_to_first_frame: float | None
    #: Frames of the second batch on over the seconds from the first batch's mattes to the
    #: end: the pace once running, start-up (model build, first batch) left out.
    frames_per_s_after_first_batch: float | None
    #: Where the first seconds went: process start, model libraries, model build (its parts as
    #: ``model_build.STEP``), first batch; ``cuda_graphs``: the capture, after the first frame.
    startup: dict[str, float]
    #: Busy seconds of each stage (threads overlap, so they can add up to more than wall).
    stages: dict[str, float]
    #: Why ``--cuda-graphs`` could not capture (the model then ran eagerly).
    cuda_graphs_error: str | None = None
    #: The options of the run: those that change the frames (:func:`output_options`) and
    #: those that only change its pace.
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self, profile: bool = False) -> str:
        first = (
            f", first frame after {self.time_to_first_frame:.1f} s"
            if self.time_to_first_frame is not None
            else ""
        )
        note = f" ({self.skipped} were already done)" if self.skipped else ""
        pace = (
            f" ({self.frames_per_s_after_first_batch:.1f} after the first batch)"
            if self.frames_per_s_after_first_batch is not None
            else ""
        )
        turned = f" ({self.orientation})" if self.orientation != "upright" else ""
        lines = [
            f"segment-video: {self.frames + self.skipped} frames{turned} -> {self.output}"
            f"{note}: {self.frames_per_s:.1f} frames/s{pace}{first}"
        ]
        if profile:
            lines.append(
                "segment-video: start-up "
                + ", ".join(f"{k} {v:.2f} s" for k, v in self.startup.items())
            )
            lines.append(
                "segment-video: busy "
                + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(self.stages.items()))
                + f" over {self.seconds:.2f} s"
            )
        return "\n".join(lines)


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where it cannot tell)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - started)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segment-video",
        description="Cut every frame of a video out of its background (RGBA PNGs or a video "
        "with alpha), through the service or in this process.",
    )
    parser.add_argument("input", help="video file (anything FFmpeg reads)")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="a directory (PNG sequence, resumable), or a .webm (VP9 + alpha) or .mov "
        "(ProRes 4444) file; with an opaque --bg-color also an .mp4 (H.264)",
    )
    parser.add_argument("--model", choices=MODEL_KINDS, default="rmbg")
    parser.add_argument(
        "--server", help="service URL, e.g. http://localhost:8000 (default: run in-process)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SEGMENTOR_API_KEY"),
        help="API key for --server (default $SEGMENTOR_API_KEY)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="frames in flight to --server (default 16)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="frames per in-process batch (default 8)"
    )
    parser.add_argument(
        "--model-path",
        help="in-process model source (default RMBG_MODEL / YOLO_MODEL), e.g. a local "
        "directory, a .pt file or standin:tiny-birefnet",
    )
    parser.add_argument("--device", help="in-process device: auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="in-process on a GPU: replay the model from a CUDA graph from the second batch on "
        "(capture 0.2-0.8 s; no gain measured on a 16-core H100 machine, where the pipeline "
        "is not bound by kernel launches; see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="rmbg: estimate the foreground's own colour at soft edges (hair, motion blur), "
        "so the old background does not show through as a fringe; through --server the "
        "service estimates it, in-process the model's device",
    )
    parser.add_argument(
        "--bg-color",
        type=_colour,
        metavar="COLOUR",
        help="lay each cutout over this colour: hex (ffffff, fff, 81d4fa77 with alpha), a "
        "name (white) or r,g,b[,a]; an opaque colour gives frames without alpha (RGB PNGs, "
        "VP9 / ProRes without an alpha channel, or an .mp4)",
    )
    parser.add_argument(
        "--crop",
        action="store_true",
        help="not supported: every frame of a video (and of a PNG sequence an editor "
        "imports as footage) has one size, so frames are not cut to their subject; crop "
        "single images through the service (/v1/remove-background?crop=true)",
    )
    parser.add_argument("--conf", type=float, help="yolo: minimum detection score")
    parser.add_argument("--classes", help="yolo: comma-separated class ids to keep")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace frames an earlier run wrote"
    )
    parser.add_argument(
        "--encode",
        choices=ENCODE_PRESETS,
        default=DEFAULT_ENCODE,
        help=f"encoder effort (default {DEFAULT_ENCODE}: keeps up with a GPU; balanced and "
        "small give smaller files, slower: VP9 up to 4x smaller, PNG about 10%%)",
    )
    parser.add_argument(
        "--profile-startup",
        action="store_true",
        help="print where the first seconds went and each stage's busy time",
    )
    parser.add_argument("--report", help="write the run's summary as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.batch_size < 1:
        parser.error("--concurrency and --batch-size must be at least 1")
    if args.crop:
        parser.error(
            "--crop is not supported: every frame of a video or PNG sequence has one size, "
            "and a crop to each frame's subject would change it from frame to frame"
        )
    if args.refine and args.model != "rmbg":
        parser.error(
            f"--refine needs --model rmbg: {args.model}'s masks are hard (0 or 255), with no "
            "soft edges to refine"
        )
    try:
        args.classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    except ValueError:
        parser.error(f"--classes {args.classes!r}: expected comma-separated integers")
    return args


def _colour(text: str) -> Color:
    try:
        return parse_color(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hex(colour: Color | None) -> str | None:
    return None if colour is None else "".join(f"{c:02x}" for c in colour)


def open_writer(
    output: str,
    reader: VideoReader,
    manifest: dict[str, Any],
    overwrite: bool,
    *,
    preset: EncodePreset = DEFAULT_ENCODE,
    timer: StageTimer | None = None,
    recorded: dict[str, Any] | None = None,
    background: Color | None = None,
) -> AlphaVideoWriter | PngSequenceWriter:
    """The writer for ``output``, its path and encoder checked (no model is built yet).

    A ``.webm`` / ``.mov`` name (``.mp4`` too on an opaque ``background``) is a video file,
    refused when it exists (unless ``overwrite``) or is a directory; anything else is a PNG
    sequence directory, whose ``manifest`` (what identifies the job) decides whether it
    resumes.
    """
    kind = output_kind(output, opaque=background is not None and background[3] == 255)
    if kind != "png":
        check_writable_file(output, "output", overwrite)
        return AlphaVideoWriter(
            output,
            reader.info,
            preset=preset,
            timer=timer,
            times=reader.times,
            background=background,
        )
    return PngSequenceWriter(
        output,
        manifest,
        overwrite=overwrite,
        preset=preset,
        timer=timer,
        times=reader.times,
        recorded=recorded,
        background=background,
    )


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option that changes an output frame's pixels, as the manifest and ``--report``
    record them (``bg_color`` as 8 hex digits, so ``white`` and ``fff`` are one colour)."""
    return {
        "model": args.model,
        "model_path": args.model_path,
        "server": args.server,
        "device": args.device,
        "conf": args.conf,
        "classes": args.classes,
        "refine": args.refine,
        "bg_color": _hex(args.bg_color),
    }


def job_manifest(
    args: argparse.Namespace, reader: VideoReader, source: dict[str, Any]
) -> dict[str, Any]:
    """What a PNG sequence's frames depend on: the input (its size and first MiB's hash) and
    every option that changes a frame's pixels. A resume must match it exactly. (``--encode``
    is not here: every preset writes the same pixels.) ``source``: :func:`fingerprint`.

    ``refine`` and ``bg_color`` are written only when set, so a directory written before
    they existed (plain cutouts) still resumes, and one that has them does not resume
    without them."""
    info = reader.info
    options = {
        key: value
        for key, value in output_options(args).items()
        if key not in ("refine", "bg_color") or value
    }
    return {
        "version": 2,
        "input": os.path.basename(args.input),
        "input_size": source["size"],
        "input_sha256_first_mib": source["sha256_first_mib"],
        **options,
        "width": info.width,
        "height": info.height,
        "orientation": info.orientation.describe(),
        "fps": str(info.fps),
        "time_base": str(info.time_base),
    }


def _import_model_libraries() -> None:
    """Import torch and the segmentation library now, so the start-up profile can tell the
    import time apart from the model build (``build_matte_source`` reports a missing one)."""
    try:
        import segmentation.factory
        import segmentation.local  # noqa: F401
    except ImportError:
        pass


def build_matte_source(
    args: argparse.Namespace, frames: int | None = None
) -> tuple[MatteSource, Callable[[], Awaitable[None]]]:
    """The source for ``args`` (a clip of ``frames`` frames, if known) and a coroutine
    function that releases it."""
    detect = {k: v for k, v in (("conf", args.conf), ("classes", args.classes)) if v is not None}
    if args.server:
        from segmentation_client.client import AsyncSegmentorClient

        client = AsyncSegmentorClient(
            args.server, api_key=args.api_key, max_concurrency=args.concurrency
        )
        source = ServiceMattes(
            client, args.model, detect, window=args.concurrency, refine=args.refine
        )
        return source, client.close
    try:
        from segmentation.config import load_settings
        from segmentation.factory import build_segmentor
        from segmentation.local import LocalRunner
        from segmentation.options import DetectOptions
    except ImportError as exc:
        raise VideoError(
            f"running the model in this process needs the model libraries ({exc.name} is "
            "missing): pip install 'product-segmentor[serve]', or send the frames to a "
            "running service with --server URL"
        ) from None

    if "classes" in detect:
        detect["classes"] = tuple(detect["classes"])
    runner = LocalRunner(
        args.model,
        build_segmentor(args.model, load_settings(), model=args.model_path, device=args.device),
        batch_size=args.batch_size,
        detect=DetectOptions(**detect),
        cuda_graphs=args.cuda_graphs,
        quick_start=not frames or frames < QUICK_START_FRAMES,
        refine=args.refine,
    )

    async def nothing() -> None:
        return None

    return LocalMattes(runner, chunk=args.batch_size), nothing


async def run(args: argparse.Namespace) -> RunReport:
    startup = {"process_start": round(process_age(), 3)}
    began = time.perf_counter() - startup["process_start"]
    timer = StageTimer()
    with VideoReader(args.input) as reader:
        identity = fingerprint(args.input)
        manifest = job_manifest(args, reader, identity)
        recorded = {"input_path": identity["path"], "input_mtime_ns": identity["mtime_ns"]}
        writer = open_writer(
            args.output,
            reader,
            manifest,
            args.overwrite,
            preset=args.encode,
            timer=timer,
            recorded=recorded,
            background=args.bg_color,
        )
        if not args.server:
            mark = time.perf_counter()
            await asyncio.to_thread(_import_model_libraries)
            startup["model_libraries"] = round(time.perf_counter() - mark, 3)
        mark = time.perf_counter()
        source, release = build_matte_source(args, reader.info.frames)
        startup["model_build"] = round(time.perf_counter() - mark, 3)
        if isinstance(source, LocalMattes):
            source.timer = timer
            # Where the build went, where the segmentor says (RMBG-2.0: code, device, init,
            # weights, prepare).
            steps = getattr(source.runner.segmentor, "load_seconds", {})
            startup.update({f"model_build.{step}": round(t, 3) for step, t in steps.items()})
        bar = tqdm(
            total=reader.info.frames, unit="frame", disable=args.no_progress, file=sys.stderr
        )
        started = time.perf_counter()
        try:
            stats = await segment_frames(iter(reader), source, writer, bar.update, timer)
        finally:
            bar.close()
            await release()
            if isinstance(source, LocalMattes):
                await source.close()
            writer.close()
        elapsed = time.perf_counter() - started
    cuda_graphs_error = None
    if isinstance(source, LocalMattes):
        if source.first_call is not None:
            startup["first_batch"] = round(source.first_call, 3)
        if source.runner.graph_seconds is not None:
            startup["cuda_graphs"] = round(source.runner.graph_seconds, 3)
        cuda_graphs_error = source.runner.graph_error
    first = stats.first_written
    after = started + elapsed - stats.first_batch_at if stats.first_batch_at else 0.0
    later_frames = stats.processed - stats.first_batch_frames
    return RunReport(
        input=args.input,
        output=args.output,
        model=args.model,
        mode="server" if args.server else "in-process",
        encode=args.encode,
        frames=stats.processed,
        skipped=stats.skipped,
        width=reader.info.width,
        height=reader.info.height,
        orientation=reader.info.orientation.describe(),
        duration=round(reader.times.duration(), 6),
        seconds=round(elapsed, 3),
        frames_per_s=round(stats.processed / elapsed, 2) if elapsed > 0 else 0.0,
        time_to_first_frame=round(first - began, 3) if first is not None else None,
        frames_per_s_after_first_batch=round(later_frames / after, 2)
        if later_frames > 0 and after > 0
        else None,
        startup=startup,
        stages={k: round(v, 3) for k, v in timer.seconds.items()},
        cuda_graphs_error=cuda_graphs_error,
        options={
            **output_options(args),
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "cuda_graphs": args.cuda_graphs,
            "overwrite": args.overwrite,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from segmentation_client.client import ServiceError

    try:
        if args.report:
            check_writable_file(args.report, "report")
        report = asyncio.run(run(args))
    except ServiceError as exc:
        print(f"segment-video: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except VideoError as exc:
        print(f"segment-video: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Reading the input or writing the output failed mid-run (a full disk, a lost mount).
        where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
        print(f"segment-video: error:{where} {_reason(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segment-video: interrupted; run again to resume a PNG sequence", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"segment-video: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report.summary(profile=args.profile_startup), file=sys.stderr)
    if args.report:
        try:
            Path(args.report).write_text(json.dumps(asdict(report), indent=2))
        except OSError as exc:
            print(f"segment-video: error: cannot write the report: {_reason(exc)}", file=sys.stderr)
            return 2
    return 0


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


if __name__ == "__main__":
    sys.exit(main())
