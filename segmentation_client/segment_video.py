"""``segment-video``: cut every frame of a video out of its background.

    segment-video INPUT -o OUTPUT [--model rmbg|yolo] [--server URL]

OUTPUT is a directory (RGBA PNG sequence ``frame_000000.png``..., resumable) or a ``.webm``
(VP9 with alpha) / ``.mov`` (ProRes 4444) file. With ``--server`` the frames go to a running
service (bounded concurrency, retries on 503/429); without it the segmentor runs in this
process, on the GPU when there is one, configured by the same environment variables as the
service. ``--model rmbg`` keeps RMBG-2.0's alpha matte; ``--model yolo`` keeps the pixels of
the objects YOLO11-seg finds (the union of their instance masks). Audio is not copied.

Exit status: 0 done, 1 the frames could not be segmented (service error, model error),
2 bad arguments or unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm import tqdm

from segmentation_client.video import (
    ALPHA_CODECS,
    AlphaVideoWriter,
    PngSequenceWriter,
    VideoError,
    VideoReader,
)

ModelKind = Literal["rmbg", "yolo"]
MODEL_KINDS: tuple[ModelKind, ...] = ("rmbg", "yolo")

#: Most frame writes (PNG encodes) waiting at once; bounds the memory held by decoded frames.
MAX_PENDING_WRITES = 32


class Matter(Protocol):
    """Turns frames into alpha mattes; ``chunk`` frames per call, ``window`` calls in flight."""

    chunk: int
    window: int

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]: ...


class Writer(Protocol):
    def has(self, index: int) -> bool: ...

    def submit(self, index: int, frame: np.ndarray, alpha: np.ndarray) -> Future[None]: ...

    def close(self) -> None: ...


@dataclass
class ServiceMatter:
    """Mattes from a running service: one request per frame, ``window`` in flight."""

    client: Any  # AsyncSegmentorClient
    model: ModelKind
    detect: dict[str, Any] = field(default_factory=dict)
    chunk: int = 1
    window: int = 16

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        async def one(frame: np.ndarray) -> np.ndarray:
            if self.model == "rmbg":
                matte = await self.client.remove_background(frame, output="mask")
                return await asyncio.to_thread(matte.alpha)
            found = await self.client.segment(frame, **self.detect)
            return await asyncio.to_thread(found.union_mask)

        return list(await asyncio.gather(*(one(f) for f in frames)))


@dataclass
class LocalMatter:
    """Mattes from a segmentor in this process, ``chunk`` frames per batch (OOM-safe)."""

    segmenter: Any  # LocalSegmenter
    chunk: int = 8
    window: int = 2

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        outputs = await asyncio.to_thread(self.segmenter, frames)
        return [output.alpha for output in outputs]


async def segment_frames(
    frames: Iterator[np.ndarray],
    matter: Matter,
    writer: Writer,
    progress: Callable[[int], Any] = lambda n: None,
) -> tuple[int, int]:
    """Matte and write every frame in order; frames the writer already has are skipped.

    Up to ``matter.window`` calls are in flight and up to ``MAX_PENDING_WRITES`` writes are
    pending, so memory stays bounded however long the video. Returns the frames segmented
    and the frames skipped.
    """
    in_flight: deque[tuple[list[int], list[np.ndarray], Awaitable[list[np.ndarray]]]] = deque()
    writes: deque[Future[None]] = deque()
    processed = skipped = 0

    async def settle_oldest() -> None:
        nonlocal processed
        indices, batch, call = in_flight.popleft()
        mattes = await call
        for index, frame, alpha in zip(indices, batch, mattes, strict=True):
            writes.append(writer.submit(index, frame, alpha))
            while len(writes) > MAX_PENDING_WRITES:
                await asyncio.wrap_future(writes.popleft())
        processed += len(indices)
        progress(len(indices))

    def dispatch(indices: list[int], batch: list[np.ndarray]) -> None:
        in_flight.append((indices, batch, asyncio.ensure_future(matter.mattes(batch))))

    indices: list[int] = []
    batch: list[np.ndarray] = []
    index = 0
    done = object()
    while (frame := await asyncio.to_thread(next, frames, done)) is not done:
        assert isinstance(frame, np.ndarray)
        if writer.has(index):
            skipped += 1
            progress(1)
        else:
            indices.append(index)
            batch.append(frame)
            if len(batch) == matter.chunk:
                dispatch(indices, batch)
                indices, batch = [], []
            while len(in_flight) >= matter.window:
                await settle_oldest()
        index += 1
    if batch:
        dispatch(indices, batch)
    try:
        while in_flight:
            await settle_oldest()
        while writes:
            await asyncio.wrap_future(writes.popleft())
    finally:
        for _, _, call in in_flight:
            if isinstance(call, asyncio.Future):
                call.cancel()
    return processed, skipped


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
        "(ProRes 4444) file",
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
    parser.add_argument("--conf", type=float, help="yolo: minimum detection score")
    parser.add_argument("--classes", help="yolo: comma-separated class ids to keep")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace frames an earlier run wrote"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.batch_size < 1:
        parser.error("--concurrency and --batch-size must be at least 1")
    try:
        args.classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    except ValueError:
        parser.error(f"--classes {args.classes!r}: expected comma-separated integers")
    return args


def open_writer(output: str, reader: VideoReader, manifest: dict[str, Any], overwrite: bool) -> Any:
    path = Path(output)
    if path.suffix.lower() in ALPHA_CODECS:
        if path.exists() and not overwrite:
            raise VideoError(f"{output} exists; pass --overwrite to replace it")
        return AlphaVideoWriter(path, reader.info)
    if path.suffix and not path.is_dir():
        raise VideoError(
            f"cannot write {path.name!r}: use a directory (PNG sequence) or a "
            f"{' / '.join(ALPHA_CODECS)} file (MP4 has no alpha channel)"
        )
    return PngSequenceWriter(path, manifest, overwrite=overwrite)


def build_matter(args: argparse.Namespace) -> tuple[Matter, Callable[[], Awaitable[None]]]:
    """The matter for ``args`` and a coroutine function that releases it."""
    detect = {k: v for k, v in (("conf", args.conf), ("classes", args.classes)) if v is not None}
    if args.server:
        from segmentation_client.client import AsyncSegmentorClient

        client = AsyncSegmentorClient(
            args.server, api_key=args.api_key, max_concurrency=args.concurrency
        )
        return ServiceMatter(client, args.model, detect, window=args.concurrency), client.close
    try:
        from segmentation.config import load_settings
        from segmentation.factory import build_segmentor
        from segmentation.local import LocalSegmenter
        from segmentation.options import DetectOptions
    except ImportError as exc:
        raise VideoError(
            f"running the model in this process needs the model libraries ({exc.name} is "
            "missing): pip install 'product-segmentor[serve]', or send the frames to a "
            "running service with --server URL"
        ) from None

    if "classes" in detect:
        detect["classes"] = tuple(detect["classes"])
    segmenter = LocalSegmenter(
        args.model,
        build_segmentor(args.model, load_settings(), model=args.model_path, device=args.device),
        batch_size=args.batch_size,
        detect=DetectOptions(**detect),
    )

    async def nothing() -> None:
        return None

    return LocalMatter(segmenter, chunk=args.batch_size), nothing


async def run(args: argparse.Namespace) -> int:
    with VideoReader(args.input) as reader:
        manifest = {
            "input": os.path.basename(args.input),
            "model": args.model,
            "model_path": args.model_path,
            "width": reader.info.width,
            "height": reader.info.height,
            "fps": str(reader.info.fps),
        }
        writer = open_writer(args.output, reader, manifest, args.overwrite)
        matter, release = build_matter(args)
        bar = tqdm(
            total=reader.info.frames, unit="frame", disable=args.no_progress, file=sys.stderr
        )
        try:
            processed, skipped = await segment_frames(iter(reader), matter, writer, bar.update)
        finally:
            bar.close()
            await release()
            writer.close()
    note = f" ({skipped} were already done)" if skipped else ""
    print(f"segment-video: {processed + skipped} frames -> {args.output}{note}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except VideoError as exc:
        print(f"segment-video: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segment-video: interrupted; run again to resume a PNG sequence", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"segment-video: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
