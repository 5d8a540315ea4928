"""What both segmentor deployments share: loading, batching, OOM safety, warm-up, health.

Frames arrive decoded and validated (the router decodes each request on its own, so a
corrupt image fails only its own request).

**One batching path.** Each frame is put on one queue the replica owns, with a future for its
answer; one task forms batches from it and runs them, one at a time, on a single GPU thread.
A batch is formed when the GPU thread is free: it takes every waiting frame up to the live cap
at once, and waits for more only while fewer than the cap are queued and the oldest frame has
waited less than ``batch_wait_timeout_s``. Frames that arrive while a batch runs are simply
queued, so the next batch is as full as the arrivals allow, whatever their pattern.

Why not ``@serve.batch``: it cuts a batch when its window closes, not when the GPU is free,
and forms the next one while the previous runs. Under a model slower than the window it
emitted many small batches that then waited in line for the GPU thread; the replica had to
merge them again behind it (a second queue), and the two queues disagreed on the cap and on
what a deadline or a full queue meant. One queue has one cap (the OOM-adaptive one), drops
frames whose deadline passed at the moment their batch forms, skips frames whose caller went
away, and answers ``OverloadedError`` (503, Retry-After) when ``max_queued_frames`` wait.

**Failures stay with their frame.** The runner (:class:`segmentation.batching.OOMSafeRunner`)
splits a batch that fails, on OOM or any other model error, down to the frame that fails; that
frame gets its own typed error, the others their results. ``frames_total`` counts every frame
by outcome.

**Live reconfigure.** Warm-up at a new batch size, building the bucket sizes and capturing CUDA
graphs run as one job on the GPU thread, between two batches: no batch runs beside them (so a
peak-memory measurement is the warm-up's own) and the model is never run from another thread.
The new config is installed in one step on the event loop only once that job succeeded; a
failure leaves the old config, buckets and graphs in place and is raised, so ``serve status``
shows it. A change of the wait or of ``oom_recover_after`` alone keeps the cap an OOM lowered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from segmentation import encoders
from segmentation.batching import (
    AdaptiveBatchCap,
    BatchReport,
    OOMSafeRunner,
    batch_buckets,
    is_oom,
)
from segmentation.config import Settings, load_settings
from segmentation.device_decode import decode_jpegs_on
from segmentation.errors import (
    DeadlineExceededError,
    OverloadedError,
    PayloadTooLargeError,
    SegmentationError,
)
from segmentation.imaging import EncodedImage, decode_image
from segmentation.models.base import StageClock, gpu_memory, weights_sha256
from segmentation.transfer import Arrival, Arriving
from segmentation_service.autoscaling import HELD_FRAMES
from segmentation_service.config import BatchConfig, SegmentorArgs
from segmentation_service.errors import http_status
from segmentation_service.faults import with_faults
from segmentation_service.metrics import SegmentorMetrics
from segmentation_service.resources import codec_threads

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


@dataclass(eq=False)
class Pending:
    """A decoded frame waiting for a batch, and where its answer goes. Compared by identity:
    a field-wise ``==`` would compare the frames' pixel arrays."""

    frame: Any  # uint8 HxWx3 array, or an EncodedImage decoded on the model's device
    options: Any
    enqueued: float
    deadline: float | None
    #: Resolved with the frame's output or its error (None for warm-up frames).
    answer: asyncio.Future[Any] | None = None
    #: Part of ``frame`` the model sees, ``(left, top, right, bottom)``; None: all of it.
    crop: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class _Prepared:
    """What a reconfigure's GPU job measured and built, installed only if it all succeeded."""

    memory_cap: int | None
    warmed_batch: int
    ceiling: int


class SegmentorReplica:
    """Base class of the segmentor deployments; subclasses load the model and run a batch."""

    name = "segmentor"

    def __init__(self, args: dict[str, Any] | SegmentorArgs | None = None) -> None:
        self._created = time.monotonic()
        self.args = SegmentorArgs.model_validate(args or {})
        settings = load_settings()
        self.segmentor = self.load(self.args, settings)
        #: Seconds from the replica's construction: model loaded, first batch config
        #: installed (warm-up, compile, CUDA graphs: ready for traffic).
        self.startup_s: dict[str, float | None] = {
            "load": round(time.monotonic() - self._created, 2),
            "ready": None,
        }
        self.device = self.segmentor.device
        self.batch_config = BatchConfig()
        self.cap = AdaptiveBatchCap(
            self.batch_config.max_batch_size, self.batch_config.oom_recover_after
        )
        self.runner = OOMSafeRunner(with_faults(self.run_model, self.args, self.name), self.cap)
        self.metrics = SegmentorMetrics(self.name)
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-gpu")
        #: Waits for a batch's outputs to reach the host (``Arriving`` outputs: their copy
        #: runs on the device's copy engine while the GPU thread takes the next batch).
        self._copier = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-copy")
        #: The last batch whose outputs are arriving, answered when they have: at most one
        #: is under way when the next batch leaves the GPU thread.
        self._arriving: asyncio.Future[None] | None = None
        #: That batch's outputs (GPU thread only; weak: answered, they are gone): a reconfigure
        #: finishes them on the GPU thread before it measures memory or captures graphs, so
        #: that the copy thread makes no CUDA call during a capture and their device memory is
        #: not counted.
        self._unfinished: list[weakref.ref[Arrival[Any]]] = []
        #: ``args.decode_ahead``: the next batch's device decode, beside the GPU thread.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-decode")
        self._decode_stream: Any = None
        #: Held by a decode ahead and by a reconfigure's warm-up and graph capture: a CUDA
        #: call from another thread during a capture would invalidate it.
        self._device_work = threading.Lock()
        #: Frames whose JPEG was decoded ahead of their batch (``args.decode_ahead``).
        self.frames_decoded_ahead = 0
        self._queue: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        #: Frames of the batch on the GPU thread now (0 between batches).
        self._running_frames = 0
        #: Frames of the batch decoded ahead, waiting for the running one (``decode_ahead``).
        self._next_frames = 0
        self._reconfiguring = asyncio.Lock()
        #: Image codecs of this replica (CPU decodes, PNG encodes), one thread per CPU Ray
        #: gave it: OpenCV and Pillow's codecs run outside the interpreter lock, so they use
        #: those cores without slowing the GPU thread's kernel launches.
        self.codec_threads = codec_threads()
        self._codec = ThreadPoolExecutor(
            self.codec_threads, thread_name_prefix=f"{self.name}-codec"
        )
        #: Pixels of frames decoded on the host that this replica holds now (queued,
        #: running or being decoded): bounded by ``args.max_host_pixels``.
        self.host_pixels = 0
        #: Outputs handed to the codec threads and not encoded yet; the batch loop waits while
        #: there are more than two batches of them, so a slow encoder holds frames in the
        #: queue (bounded) rather than host arrays in memory.
        self._encoding = 0
        self._encoded = asyncio.Event()
        #: Seconds the GPU thread spent on batches (for the busy fraction over a window).
        self.gpu_busy_s = 0.0
        self.memory_fraction = self._limit_gpu_memory()
        self.memory_cap: int | None = None
        self.warmed_batch = 0
        self._built_sizes: set[int] = set()
        self.batches_run = 0
        self.oom_splits = 0
        self.error_splits = 0
        self._fp32_reported = 0
        self.largest_batch = 0
        #: Largest batch that ran since the current batch config was installed.
        self.largest_batch_since_config = 0
        #: Model calls per batch size (every call the runner made, splits included).
        self.call_sizes: Counter[int] = Counter()
        #: Seconds per model step of the batch on the GPU thread (filled by ``run_model``).
        self.step_timings: dict[str, float] | None = None
        info = self.segmentor.info()
        self.weights_sha256 = _weights_sha256(info.source)
        logger.info(
            "%s ready: source=%s precision=%s (%s) device=%s%s",
            self.name,
            info.source,
            info.precision,
            info.precision_reason,
            info.device,
            f" STAND-IN ({info.stand_in_weights})" if info.stand_in else "",
        )

    # -- subclass hooks ---------------------------------------------------------------
    def load(self, args: SegmentorArgs, settings: Settings) -> Any:
        raise NotImplementedError

    def run_model(self, items: list[Pending]) -> list[Any]:
        """Outputs of one batch, one per item (an exception in an item's place fails it
        alone). Runs on the GPU thread only."""
        raise NotImplementedError

    def warmup_options(self) -> Any:
        return None

    def warmup_extra(self) -> None:
        """Subclass hook: anything else to initialise before traffic (e.g. a decoder)."""

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        """Subclass hook: capture CUDA graphs at these batch sizes, where the model gains.
        A failed capture must leave the graphs that were there."""

    # -- configuration ------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` live: batch size, wait and OOM recovery, no restart.

        Serve awaits this on the replica's event loop, so the work runs on the GPU thread
        (between two batches) and only the final swap happens here. On failure the previous
        config stays and the error is raised: Serve reports it as the deployment's error.
        """
        config = BatchConfig.model_validate(user_config)
        async with self._reconfiguring:
            loop = asyncio.get_running_loop()
            try:
                prepared = await loop.run_in_executor(self._gpu, self._prepare, config)
            except Exception as exc:
                message = (
                    f"{self.name}: batch config {config.model_dump()} could not be applied "
                    f"({type(exc).__name__}: {exc}); still running "
                    f"{self.batch_config.model_dump()}"
                )
                logger.error(message)
                raise RuntimeError(message) from exc
            self._install(config, prepared)

    def _prepare(self, config: BatchConfig) -> _Prepared:
        """On the GPU thread: warm up at a larger batch, build the batch sizes of the new
        ceiling and capture their graphs. Live state changes only where all of it worked."""
        with self._device_work:
            for unfinished in self._unfinished:  # done by now, or nearly
                arrival = unfinished()
                if arrival is not None:
                    with contextlib.suppress(Exception):  # the copy thread reports it
                        arrival.result()
            self._unfinished = []
            memory_cap, warmed = self.memory_cap, self.warmed_batch
            if config.max_batch_size > warmed:
                memory_cap = self._measure(config.max_batch_size)
                warmed = config.max_batch_size
                if self.warmed_batch == 0:
                    self.warmup_extra()
            ceiling = min(config.max_batch_size, memory_cap or config.max_batch_size)
            self._build_buckets(batch_buckets(ceiling))
        return _Prepared(memory_cap, warmed, ceiling)

    def _install(self, config: BatchConfig, prepared: _Prepared) -> None:
        """Swap in a prepared config; no ``await`` here, so no batch forms half-way."""
        starting = self.startup_s["ready"] is None
        if starting:
            self.startup_s["ready"] = round(time.monotonic() - self._created, 2)
        self.batch_config = config
        self.memory_cap = prepared.memory_cap
        self.warmed_batch = prepared.warmed_batch
        self.cap.recover_after = config.oom_recover_after
        if prepared.ceiling != self.cap.ceiling:
            self.cap.set_ceiling(prepared.ceiling)  # a new maximum applies at once
        # else: only the wait or the recovery changed; a cap lowered by an OOM stays
        self.largest_batch_since_config = 0
        self.metrics.batch_cap.set(float(self.cap.value))
        self._wake.set()  # a batch window may have changed
        logger.info("%s batch config: %s (cap %d)", self.name, config.model_dump(), self.cap.value)
        if starting:
            self._warn_of_compiled_misses()

    def _warn_of_compiled_misses(self) -> None:
        """Say in the log when graphs a loaded compiled artifact should have held were
        compiled at start-up (minutes on a GPU): an artifact built with other settings, or
        for another batch size, than the replica's."""
        try:
            report = self.segmentor.info().compile or {}
            missed = (report.get("inductor_cache") or {}).get("misses", 0)
        except Exception:  # a log line only: never in the way of a replica's start
            logger.exception("%s: reading the compile report failed", self.name)
            return
        if missed:
            logger.warning(
                "%s compiled %d graph(s) at start-up that its compiled artifact %s lacked "
                "(ready in %.0f s): build it again with the replicas' settings and "
                "max_batch_size (docs/operations.md, RMBG_COMPILE_CACHE)",
                self.name,
                missed,
                report.get("artifact"),
                self.startup_s["ready"],
            )

    def _limit_gpu_memory(self) -> float | None:
        """Hold this process to its share of the card: Ray does not isolate GPU memory."""
        if self.device.type != "cuda":
            return None
        fraction = self.args.gpu_memory_fraction
        if fraction is None:
            import ray

            share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
            fraction = share if 0 < share < 1 else None
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction, self.device)
            logger.info("%s limited to %.0f%% of GPU memory", self.name, fraction * 100)
        return fraction

    def warmup_frame(self) -> np.ndarray:
        """A random uint8 RGB frame of ``warmup_size``."""
        height, width = self.args.warmup_size
        return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)

    def warmup_input(self) -> np.ndarray | EncodedImage:
        """What a warm-up batch holds: the warm-up frame as a JPEG where the device decodes
        JPEGs (so the decoder is initialised, 4.9 s on an H100 the first time, and its
        memory is in the measured peak), else the frame's pixels."""
        frame = self.warmup_frame()
        if not (self.args.device_jpeg_decode and self.device.type == "cuda"):
            return frame
        height, width = frame.shape[:2]
        return EncodedImage(encoders.jpeg(frame, quality=90), width, height)

    def _warmup_run(self, n: int, measured: bool = False) -> int:
        """Run the model on ``n`` copies of a warm-up input; the peak GPU memory (0 on CPU).

        ``measured``: where outputs arrive after their batch (``Arriving``), a second batch
        runs while the first one's outputs and frames are still held, as in service, so that
        the peak counts both. GPU thread only: the peak is reset here, which is the warm-up's
        own only because no batch can run beside it.
        """
        frame = self.warmup_input()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

        def batch() -> list[Pending]:
            return [Pending(frame, self.warmup_options(), time.monotonic(), None) for _ in range(n)]

        outputs = self.run_model(batch())
        if measured and any(isinstance(output, Arriving) for output in outputs):
            _arrived(self.run_model(batch()))
        for output in _arrived(outputs):
            if isinstance(output, Exception):
                raise output
        self._built_sizes.add(n)
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def _measure(self, batch_size: int) -> int | None:
        """Run batches of 1 and ``batch_size`` frames, so a memory problem shows at deploy time;
        the memory cap in frames (None on CPU).

        Both run at their own size with the live batch sizes in place: 1 is always one of them
        and ``batch_size`` is larger than any (they never exceed a batch warmed before). On a
        GPU the two peaks give the per-frame activation cost, and the cap is set so weights +
        activations fit the replica's budget.
        """
        started = time.perf_counter()
        peak_one = self._warmup_run(1, measured=True)
        peak_all = self._warmup_run(batch_size, measured=True) if batch_size > 1 else peak_one
        memory_cap = None
        if self.device.type == "cuda":
            per_frame = max(1, (peak_all - peak_one) // max(1, batch_size - 1))
            budget = int(
                torch.cuda.get_device_properties(self.device).total_memory
                * (self.memory_fraction or 1.0)
                * 0.92
            )
            weights = torch.cuda.memory_allocated(self.device)
            memory_cap = max(1, (budget - weights) // per_frame)
            logger.info(
                "%s warm-up: batch %d peak %.2f GiB, %.3f GiB per frame, memory cap %d frames",
                self.name,
                batch_size,
                peak_all / 2**30,
                per_frame / 2**30,
                memory_cap,
            )
            self.metrics.memory(gpu_memory(self.device))
        logger.info(
            "%s warmed up at batch %d in %.1fs",
            self.name,
            batch_size,
            time.perf_counter() - started,
        )
        return memory_cap

    def _build_buckets(self, buckets: tuple[int, ...]) -> None:
        """On the GPU thread: run every bucket size once, capture graphs, then pad batches to
        those sizes; on any failure the previous sizes stay.

        The first call at a new batch size builds cuDNN plans (seconds on an H100); doing it
        here keeps that cost off the requests.
        """
        previous = self.segmentor.batch_buckets
        if buckets == previous:
            return  # built and captured already (e.g. only the batch wait changed)
        started = time.perf_counter()
        self.segmentor.batch_buckets = buckets  # each size below runs as itself, unpadded
        # A new largest size runs again with the new sizes in place, whatever ran before: what
        # runs at it follows them (RMBG-2.0's compiled decoder compiles for the largest only).
        if previous is not None and max(previous) != max(buckets):
            self._built_sizes.discard(max(buckets))
        try:
            for size in buckets:
                if size not in self._built_sizes:
                    self._warmup_run(size)
            self.prepare_graphs(buckets)
        except BaseException:
            self.segmentor.batch_buckets = previous
            raise
        logger.info(
            "%s batch sizes %s ready in %.1fs",
            self.name,
            ",".join(map(str, buckets)),
            time.perf_counter() - started,
        )

    # -- request path -------------------------------------------------------------------
    def device_decodes(self, image: EncodedImage) -> bool:
        """Whether ``image`` stays encoded until its batch runs and is decoded on the device
        (nvJPEG), instead of on this replica's codec threads."""
        return (
            image.device_decodable and self.args.device_jpeg_decode and self.device.type == "cuda"
        )

    @asynccontextmanager
    async def prepared(self, image: EncodedImage | np.ndarray) -> AsyncIterator[Any]:
        """A frame ready for batching, for the block. Arrays pass through; JPEGs the device
        decodes stay encoded until their batch runs; anything else is decoded here, on the
        codec threads, while its pixels fit ``max_host_pixels`` (503 with Retry-After when
        not: decoded frames are what fill a replica's memory). A frame that fails to decode
        gets its own 400, 413 or 415."""
        if isinstance(image, np.ndarray):
            yield image
            return
        if image.pixels > self.args.max_pixels:
            raise PayloadTooLargeError(
                f"image is {image.width}x{image.height} = {image.pixels} pixels, over the "
                f"limit of {self.args.max_pixels}"
            )
        if self.device_decodes(image):
            yield image
            return
        if self.host_pixels + image.pixels > self.args.max_host_pixels:
            self.metrics.reject("host_pixels")
            raise OverloadedError(
                f"this replica holds {self.host_pixels} decoded pixels (limit "
                f"max_host_pixels={self.args.max_host_pixels}); retry shortly",
                1,
            )
        self.host_pixels += image.pixels
        try:
            yield await self.decode(image.data)
        finally:
            self.host_pixels -= image.pixels

    async def decode(self, data: bytes) -> np.ndarray:
        """Decode on the codec threads; a bad image is counted and raised. The decode runs to
        its end even when the caller goes away (a thread cannot be stopped), so the caller's
        pixel budget is held by :meth:`prepared` until then."""
        submitted = time.perf_counter()
        started: list[float] = []

        def work() -> np.ndarray:
            started.append(time.perf_counter())
            return decode_image(data, max_pixels=self.args.max_pixels)

        job = asyncio.get_running_loop().run_in_executor(self._codec, work)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.gather(job, return_exceptions=True)  # until the thread let go
            raise
        except SegmentationError as exc:
            self.metrics.reject(exc.code)
            self.metrics.answered(_outcome(exc))
            raise
        finally:
            if started:  # time waiting for a thread and decoding, apart
                self.metrics.stage("decode_wait", started[0] - submitted)
                self.metrics.stage("decode", time.perf_counter() - started[0])

    async def run_codec(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the codec threads (encoders, header probes), timed as ``codec:<name>``."""
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._codec, lambda: fn(*args, **kwargs)
            )
        finally:
            self.metrics.stage(f"codec:{fn.__name__}", time.perf_counter() - started)

    async def encode(self, fn: Callable[..., T], *args: Any) -> T:
        """Encode an output on the codec threads, counted in the batch loop's backpressure
        until the encode has really ended (a caller that goes away does not stop it)."""
        self._encoding += 1
        job = asyncio.ensure_future(self.run_codec(fn, *args))

        def done(_: object) -> None:
            self._encoding -= 1
            self._encoded.set()

        job.add_done_callback(done)
        return await asyncio.shield(job)

    async def submit(
        self,
        frame: Any,
        options: Any,
        deadline: float | None,
        crop: tuple[int, int, int, int] | None = None,
    ) -> Any:
        """Queue one frame for batching; its output, or raise the error it got. A caller that
        goes away (its request cancelled) takes its frame out of the queue at once."""
        if deadline is not None and time.time() > deadline:
            self.metrics.reject("deadline")
            self.metrics.answered("deadline")
            raise DeadlineExceededError("the request deadline passed before it was queued")
        if len(self._queue) >= self.args.max_queued_frames:
            self.metrics.reject("queue_full")
            self.metrics.answered("overloaded")
            raise OverloadedError(
                f"{self.args.max_queued_frames} frames are waiting for this model; retry shortly",
                1,
            )
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        item = Pending(frame, options, time.monotonic(), deadline, answer, crop)
        self._queue.append(item)
        self._wake.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = loop.create_task(self._form_batches())
        try:
            result = await answer
        except asyncio.CancelledError:
            # Still queued: it leaves now (no slot held, nothing reported to the autoscaler).
            # Already running: _answer counts it when its batch ends.
            for index, queued in enumerate(self._queue):
                if queued is item:
                    del self._queue[index]
                    self.metrics.answered("cancelled")
                    break
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    async def submit_each(
        self, images: list[Any], options: Any, deadline: float | None
    ) -> list[Any]:
        """Queue every image of one call for batching: one result, or the error it got, per
        image, in order. One handle call carries many frames, so the replica's interpreter
        handles one request where it would handle dozens."""

        async def one(image: Any) -> Any:
            async with self.prepared(image) as frame:
                return await self.submit(frame, options, deadline)

        return list(await asyncio.gather(*(one(i) for i in images), return_exceptions=True))

    def device_frames(self, items: list[Pending]) -> list[Any]:
        """On the GPU thread: each item's frame as the model takes it. Encoded JPEGs not
        decoded ahead are decoded on the device now (:meth:`_decode_encoded`); a JPEG that
        fails gets its own error in its place; crops are views."""
        clock = StageClock(self.device, self.step_timings)
        if self._decode_encoded(items):
            clock.lap("jpeg_decode")
        frames: list[Any] = [item.frame for item in items]
        for index, item in enumerate(items):
            if item.crop is not None and not isinstance(frames[index], Exception):
                frames[index] = _crop(frames[index], item.crop)
        return frames

    def _decode_encoded(self, items: Sequence[Pending]) -> int:
        """Decode the items' encoded JPEGs on the device in one call, in place (one image
        shared by several items, the crops of ``/v1/products``, once; a JPEG that fails
        becomes its :class:`InvalidImageError`); the number of images decoded."""
        encoded: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            if isinstance(item.frame, EncodedImage):
                key = id(item.frame) if item.crop is not None else -1 - index
                encoded.setdefault(key, []).append(index)
        if not encoded:
            return 0
        groups = list(encoded.values())
        decoded = decode_jpegs_on(self.device, [items[group[0]].frame for group in groups])
        for group, frame in zip(groups, decoded, strict=True):
            for index in group:
                items[index].frame = frame
        return len(groups)

    def _decode_ahead(self, items: list[Pending]) -> tuple[int, float]:
        """On the decode thread, while the GPU thread runs the batch before: this batch's
        JPEGs decoded on a CUDA stream of their own, finished before the batch is handed
        over; the images decoded and the seconds it took. Best effort: out of memory leaves
        them encoded for the GPU thread, whose OOM-safe runner splits the batch as usual."""
        started = time.perf_counter()
        try:
            with self._device_work:
                decoded = self._decode_on_own_stream(items)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            logger.warning("%s: out of memory decoding ahead; decoding in the batch", self.name)
            decoded = 0
        return decoded, time.perf_counter() - started

    def _decode_on_own_stream(self, items: list[Pending]) -> int:
        """:meth:`_decode_encoded` on a CUDA stream of the decode thread's, finished before
        it returns (on a CPU device, plainly)."""
        if self.device.type != "cuda":
            return self._decode_encoded(items)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            decoded = self._decode_encoded(items)
        self._decode_stream.synchronize()
        # Made on the decode stream, used and freed on the GPU thread's (the default one):
        # the caching allocator must not hand their memory out again before it is done.
        model_stream = torch.cuda.default_stream(self.device)
        for item in items:
            if isinstance(item.frame, torch.Tensor):
                item.frame.record_stream(model_stream)
        return decoded

    def _decodes_ahead(self, items: list[Pending]) -> bool:
        """Whether ``items`` are decoded ahead: asked for, and JPEGs among them that stayed
        encoded for the device to decode (``device_decodes``)."""
        return self.args.decode_ahead and any(isinstance(i.frame, EncodedImage) for i in items)

    async def _form_batches(self) -> None:
        """The one batch-forming loop: take up to the live cap when the GPU thread is free.

        With ``args.decode_ahead`` the next batch is formed while one runs, and its JPEGs
        are decoded on the decode thread meanwhile; it runs when the one before is done."""
        running: asyncio.Future[None] | None = None
        try:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                while self._encoding > 2 * max(1, self.cap.value):
                    self._encoded.clear()
                    await self._encoded.wait()
                await self._fill_window()
                batch: list[Pending] = []
                while self._queue and len(batch) < max(1, self.cap.value):
                    item = self._queue.popleft()
                    if item.answer is None or not item.answer.done():  # done: the caller left
                        batch.append(item)
                if not batch:
                    continue
                if not self._decodes_ahead(batch):
                    if running is not None:
                        await running
                        running = None
                    await self._run_batch(batch)
                    continue
                decoding = asyncio.get_running_loop().run_in_executor(
                    self._decoder, self._decode_ahead, batch
                )
                self._next_frames += len(batch)
                if running is not None:
                    await running
                running = asyncio.ensure_future(self._run_after(decoding, batch))
        finally:
            if running is not None:
                running.cancel()

    async def _run_after(
        self, decoding: Awaitable[tuple[int, float]], batch: list[Pending]
    ) -> None:
        """``batch`` once its decode ahead is done (or failed: the GPU thread decodes it);
        what it decoded is counted here, on the event loop."""
        try:
            decoded, seconds = await decoding
            if decoded:
                self.frames_decoded_ahead += decoded
                self.metrics.stage("decode_ahead", seconds)
        except Exception:  # not the frames' fault: they are decoded in the batch instead
            logger.exception("%s: decoding ahead failed; decoding in the batch", self.name)
        finally:
            self._next_frames -= len(batch)
        await self._run_batch(batch)

    async def _fill_window(self) -> None:
        """Wait while fewer frames than the cap are queued and the oldest is younger than
        ``batch_wait_timeout_s`` (frames that waited for the GPU do not wait again)."""
        while self._queue and len(self._queue) < max(1, self.cap.value):
            remaining = (
                self._queue[0].enqueued + self.batch_config.batch_wait_timeout_s - time.monotonic()
            )
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _run_batch(self, items: list[Pending]) -> None:
        """Drop expired frames, run the rest OOM-safely on the GPU thread, answer each."""
        now, wall = time.monotonic(), time.time()
        live: list[Pending] = []
        for item in items:
            self.metrics.stage("queue", now - item.enqueued)
            if item.deadline is not None and wall > item.deadline:
                self.metrics.reject("deadline")
                self._answer(
                    item,
                    DeadlineExceededError(
                        "the request deadline passed while it waited for the GPU"
                    ),
                )
            else:
                live.append(item)
        if not live:
            return
        started = time.perf_counter()
        steps: dict[str, float] = {}
        self._running_frames = len(live)
        try:
            outputs, report = await asyncio.get_running_loop().run_in_executor(
                self._gpu, self._run_on_gpu, live, steps
            )
        except Exception as exc:  # the runner answers model errors per frame: this is a bug
            logger.exception("%s: batch of %d failed outside the model", self.name, len(live))
            for item in live:
                self._answer(item, SegmentationError(f"internal error ({type(exc).__name__})"))
            return
        finally:
            self._running_frames = 0
            self.gpu_busy_s += time.perf_counter() - started
        self.metrics.stage("model", time.perf_counter() - started)
        for step, seconds in steps.items():
            self.metrics.stage(f"model:{step}", seconds)
        self._record(report)
        if not any(isinstance(output, Arriving) for output in outputs):
            for item, output in zip(live, outputs, strict=True):
                self._answer(item, output)
            return
        if self._arriving is not None:
            # the batch before's outputs, copied while this one ran (shielded: a cancelled
            # batch loop must not cancel answering them)
            await asyncio.shield(self._arriving)
        self._arriving = asyncio.ensure_future(self._answer_arrived(live, outputs))

    async def _answer_arrived(self, items: list[Pending], outputs: list[Any]) -> None:
        """Answer ``items`` once their outputs' copy to the host is done (on the copy thread,
        while the GPU thread runs the next batch). Never raises: a failure fails these frames."""
        started = time.perf_counter()
        try:
            arrived = await asyncio.get_running_loop().run_in_executor(
                self._copier, _arrived, outputs
            )
        except Exception as exc:  # _arrived answers each output's failure in its place
            logger.exception("%s: outputs of a batch of %d lost", self.name, len(items))
            arrived = [SegmentationError(f"internal error ({type(exc).__name__})")] * len(items)
        self.metrics.stage("copy_wait", time.perf_counter() - started)
        for item, output in zip(items, arrived, strict=True):
            try:
                self._answer(item, output)
            except Exception:  # e.g. a caller's future in a state it should not be in
                logger.exception("%s: a frame's answer could not be given", self.name)

    def _run_on_gpu(
        self, items: list[Pending], steps: dict[str, float]
    ) -> tuple[list[Any], BatchReport]:
        self.step_timings = steps  # set here: a reconfigure's warm-up must not write into it
        try:
            outputs, report = self.runner(items)
        finally:
            self.step_timings = None
        arriving = {id(o.batch): o.batch for o in outputs if isinstance(o, Arriving)}
        self._unfinished = [weakref.ref(arrival) for arrival in arriving.values()]
        return outputs, report

    def _record(self, report: BatchReport) -> None:
        self.batches_run += 1
        for size in report.calls:
            self.metrics.batch_size.observe(float(size))
        self.call_sizes.update(report.calls)
        self.largest_batch = max(self.largest_batch, report.largest_run)
        self.largest_batch_since_config = max(self.largest_batch_since_config, report.largest_run)
        if report.oom_splits:
            self.metrics.oom_splits.inc(report.oom_splits)
            self.oom_splits += report.oom_splits
        self.error_splits += report.error_splits
        if report.failed_frames:
            self.metrics.reject("oom")
        recomputed = getattr(self.segmentor, "fp32_recomputed", 0)
        if recomputed > self._fp32_reported:
            self.metrics.fp32_fallbacks.inc(recomputed - self._fp32_reported)
            self._fp32_reported = recomputed
        self.metrics.memory(gpu_memory(self.device))
        self.metrics.batch_cap.set(float(self.cap.value))

    def _answer(self, item: Pending, result: Any) -> None:
        if item.answer is not None and item.answer.done():  # its caller went away
            self.metrics.answered("cancelled")
            return
        self.metrics.answered(_outcome(result))
        if item.answer is not None:
            item.answer.set_result(result)

    # -- introspection ------------------------------------------------------------------
    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling hook, polled on the replica's event loop: the frames this
        replica holds, queued for the GPU plus the running batch (and the next one, when it
        is decoded ahead). Serve averages them over
        ``look_back_period_s``; ``autoscaling.FramesPerReplicaPolicy`` scales on them, since a
        call may carry 1 frame or 16."""
        held = len(self._queue) + self._running_frames + self._next_frames
        return {HELD_FRAMES: float(held)}

    async def info(self) -> dict[str, Any]:
        """Model source, precision, batch settings and memory of this replica. A coroutine:
        it reads state the event loop changes, so it runs on that loop, between its steps."""
        return {
            **self.segmentor.info().as_dict(),
            "weights_sha256": self.weights_sha256,
            "startup_s": dict(self.startup_s),
            "batch": {
                **self.batch_config.model_dump(),
                "live_cap": self.cap.value,
                "memory_cap": self.memory_cap,
                "batch_sizes": list(self.segmentor.batch_buckets or ()),
                "cuda_graph_batch_sizes": getattr(self.segmentor, "graph_batch_sizes", []),
                "cuda_graph_error": getattr(self.segmentor, "graph_error", None),
                "batches_run": self.batches_run,
                "largest_batch": self.largest_batch,
                "largest_batch_since_config": self.largest_batch_since_config,
                "model_calls_by_size": {str(k): v for k, v in sorted(self.call_sizes.items())},
                "queued_frames": len(self._queue),
                "fp32_recomputed_frames": self._fp32_reported,
                "oom_splits": self.oom_splits,
                "error_splits": self.error_splits,
            },
            "frames": self.metrics.outcomes(),
            "stages": self.metrics.totals.summary(),
            "gpu_memory": {**gpu_memory(self.device), "fraction": self.memory_fraction},
            "gpu": _gpu_identity(self.device),
            "pid": os.getpid(),
            "codec": {
                "threads": self.codec_threads,
                "host_pixels": self.host_pixels,
                "max_host_pixels": self.args.max_host_pixels,
                "encoding": self._encoding,
                "decode_ahead": self.args.decode_ahead and self.device.type == "cuda",
                "frames_decoded_ahead": self.frames_decoded_ahead,
            },
            "gpu_busy_s": round(self.gpu_busy_s, 3),
        }

    async def check_health(self) -> None:
        """Touch the model's device: a broken CUDA context fails the health check, and so does
        a batch loop that died."""
        if self._batcher is not None and self._batcher.done() and not self._batcher.cancelled():
            error = self._batcher.exception()
            if error is not None:
                raise RuntimeError(f"the batch loop stopped: {error!r}")

        def touch() -> None:
            probe = torch.ones(8, device=self.device).sum()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if float(probe) != 8.0:
                raise RuntimeError(f"device {self.device} returned a wrong result")

        await asyncio.get_running_loop().run_in_executor(self._gpu, touch)


def _crop(frame: Any, box: tuple[int, int, int, int]) -> Any:
    """A view of ``frame`` (``HxWx3`` array or ``3xHxW`` tensor) inside ``box``."""
    left, top, right, bottom = box
    if isinstance(frame, np.ndarray):
        return frame[top:bottom, left:right]
    return frame[:, top:bottom, left:right]


def _outcome(result: Any) -> str:
    """The ``frames_total`` outcome tag of one answer."""
    if not isinstance(result, BaseException):
        return "ok"
    if isinstance(result, DeadlineExceededError):
        return "deadline"
    if isinstance(result, OverloadedError):
        return "oom"  # the runner's only overload: no GPU memory for the frame alone
    if isinstance(result, SegmentationError) and http_status(result) < 500:
        return "bad_input"
    return "error"


def _weights_sha256(source: str) -> str | None:
    """sha256 of a local model's weights (``model.safetensors`` of a directory, or a ``.pt``
    file); None for a hub id, whose pinned revision says which weights it is."""
    import segmentation_standins as standins

    path = standins.materialize(source) if standins.is_standin(source) else Path(source)
    return weights_sha256(path)


def _gpu_identity(device: torch.device) -> dict[str, str | None]:
    """Which physical GPU this replica uses: replicas sharing a card report the same uuid."""
    if device.type != "cuda":
        return {"name": None, "uuid": None, "cuda_visible_devices": None}
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "uuid": str(getattr(props, "uuid", "")),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _arrived(outputs: list[Any]) -> list[Any]:
    """``outputs`` with each :class:`Arriving` one waited for (its failure in its place)."""
    done: list[Any] = []
    failed: set[int] = set()
    for output in outputs:
        if isinstance(output, Arriving):
            try:
                output = output.result()
            except Exception as exc:  # a failed copy fails its own batch's frames only
                if id(output.batch) not in failed:
                    failed.add(id(output.batch))
                    logger.exception("a batch's outputs could not be copied to the host")
                output = SegmentationError(f"the output could not be copied ({type(exc).__name__})")
        done.append(output)
    return done
