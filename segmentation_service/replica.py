"""What both segmentor deployments share: loading, batching, OOM safety, warm-up, health.

Frames arrive decoded and validated (the router decodes each request on its own, so a
corrupt image fails only its own request). Batches run on a single GPU thread, so the event
loop stays free and the next batch forms while the GPU works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segmentation.batching import AdaptiveBatchCap, OOMSafeRunner, batch_buckets
from segmentation.config import Settings, load_settings
from segmentation.errors import DeadlineExceededError, SegmentationError
from segmentation.imaging import EncodedJPEG, decode_image
from segmentation.models.base import gpu_memory
from segmentation_service.config import BatchConfig, SegmentorArgs
from segmentation_service.metrics import SegmentorMetrics

logger = logging.getLogger("ray.serve")


@dataclass
class Pending:
    """A decoded frame waiting for a batch."""

    frame: Any  # uint8 HxWx3 array, or an EncodedJPEG decoded on the model's device
    options: Any
    enqueued: float
    deadline: float | None


class SegmentorReplica:
    """Base class of the segmentor deployments; subclasses add the ``@serve.batch`` method."""

    name = "segmentor"

    def __init__(self, args: dict[str, Any] | SegmentorArgs | None = None) -> None:
        self.args = SegmentorArgs.model_validate(args or {})
        settings = load_settings()
        self.segmentor = self.load(self.args, settings)
        self.device = self.segmentor.device
        self.batch_config = BatchConfig()
        self.cap = AdaptiveBatchCap(self.batch_config.max_batch_size)
        run = self.run_model
        if self.args.fault_oom_above_batch is not None:
            run = _oom_above(run, self.args.fault_oom_above_batch)
            logger.warning(
                "%s: fault injection on, OOM above batch %d",
                self.name,
                self.args.fault_oom_above_batch,
            )
        self.runner = OOMSafeRunner(run, self.cap)
        self.metrics = SegmentorMetrics(self.name)
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-gpu")
        self._waiting: deque[tuple[list[Pending], asyncio.Future[list[Any]]]] = deque()
        self._drain_task: asyncio.Task[None] | None = None
        # The router decodes and encodes images; this pool only serves callers that send
        # encoded bytes through a handle. Few threads: codec threads in the GPU process
        # contend for the GIL with kernel launches.
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix=f"{self.name}-decode")
        self.memory_fraction = self._limit_gpu_memory()
        self.memory_cap: int | None = None
        self.warmed_batch = 0
        self._built_sizes: set[int] = set()
        self.batches_run = 0
        self.oom_splits = 0
        self._fp32_reported = 0
        self.largest_batch = 0
        #: Seconds per model step of the batch on the GPU thread (filled by ``run_model``).
        self.step_timings: dict[str, float] | None = None
        info = self.segmentor.info()
        logger.info(
            "%s ready: source=%s precision=%s (%s) device=%s%s",
            self.name,
            info.source,
            info.precision,
            info.precision_reason,
            info.device,
            " STAND-IN WEIGHTS (random, outputs are meaningless)" if info.stand_in else "",
        )

    # -- subclass hooks ---------------------------------------------------------------
    def load(self, args: SegmentorArgs, settings: Settings) -> Any:
        raise NotImplementedError

    def run_model(self, items: list[Pending]) -> list[Any]:
        raise NotImplementedError

    async def batched(self, item: Pending) -> Any:
        raise NotImplementedError

    def warmup_options(self) -> Any:
        return None

    # -- configuration ------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` live: batch size and wait, no restart."""
        config = BatchConfig.model_validate(user_config)
        self.batch_config = config
        self.cap.recover_after = config.oom_recover_after
        if config.max_batch_size > self.warmed_batch:
            self._warmup(config.max_batch_size)
        ceiling = min(config.max_batch_size, self.memory_cap or config.max_batch_size)
        self._build_buckets(ceiling)
        self.cap.set_ceiling(ceiling)
        self.batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._sync_batch_size()
        logger.info("%s batch config: %s (cap %d)", self.name, config.model_dump(), self.cap.value)

    def _sync_batch_size(self) -> None:
        self.batched.set_max_batch_size(max(1, self.cap.value))  # type: ignore[attr-defined]
        self.metrics.batch_cap.set(float(self.cap.value))

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

    def _warmup_run(self, n: int) -> int:
        """Run the model on ``n`` copies of a warm-up frame; the peak GPU memory (0 on CPU)."""
        frame = self.warmup_frame()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        items = [Pending(frame, self.warmup_options(), time.monotonic(), None)] * n
        self.run_model(items)
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def _warmup(self, batch_size: int) -> None:
        """Run the largest batch now, so a memory problem shows at deploy time.

        On a GPU, peak memory at batch 1 and at ``batch_size`` gives the per-frame activation
        cost, and the batch cap is set so weights + activations fit the replica's budget.
        """
        started = time.perf_counter()
        self.segmentor.batch_buckets = None  # measure at the sizes asked for
        peak_one = self._warmup_run(1)
        peak_all = self._warmup_run(batch_size) if batch_size > 1 else peak_one
        self._built_sizes.update({1, batch_size})
        self.warmed_batch = batch_size
        if self.device.type == "cuda":
            per_frame = max(1, (peak_all - peak_one) // max(1, batch_size - 1))
            budget = int(
                torch.cuda.get_device_properties(self.device).total_memory
                * (self.memory_fraction or 1.0)
                * 0.92
            )
            weights = torch.cuda.memory_allocated(self.device)
            self.memory_cap = max(1, (budget - weights) // per_frame)
            logger.info(
                "%s warm-up: batch %d peak %.2f GiB, %.3f GiB per frame, memory cap %d frames",
                self.name,
                batch_size,
                peak_all / 2**30,
                per_frame / 2**30,
                self.memory_cap,
            )
            self.metrics.memory(gpu_memory(self.device))
        self.warmup_extra()
        logger.info(
            "%s warmed up at batch %d in %.1fs",
            self.name,
            batch_size,
            time.perf_counter() - started,
        )

    def _build_buckets(self, ceiling: int) -> None:
        """Run every bucket size up to ``ceiling`` once, then pad batches to those sizes.

        The first call at a new batch size builds cuDNN plans (seconds on an H100); doing it
        here keeps that cost off the requests.
        """
        buckets = batch_buckets(ceiling)
        if buckets == self.segmentor.batch_buckets:
            return  # built and captured already (e.g. only the batch wait changed)
        started = time.perf_counter()
        for size in buckets:
            if size not in self._built_sizes:
                self._warmup_run(size)
                self._built_sizes.add(size)
        self.segmentor.batch_buckets = buckets
        # On the GPU thread: a capture must not overlap another thread's kernels.
        self._gpu.submit(self.prepare_graphs, buckets).result()
        logger.info(
            "%s batch sizes %s ready in %.1fs",
            self.name,
            ",".join(map(str, buckets)),
            time.perf_counter() - started,
        )

    def warmup_extra(self) -> None:
        """Subclass hook: anything else to initialise before traffic (e.g. a decoder)."""

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        """Subclass hook: capture CUDA graphs at these batch sizes, where the model gains."""

    # -- request path -------------------------------------------------------------------
    async def decode(self, image: bytes | np.ndarray | EncodedJPEG) -> Any:
        """A frame ready for batching: arrays and device-decodable JPEGs pass through."""
        if isinstance(image, (np.ndarray, EncodedJPEG)):
            return image
        submitted = time.perf_counter()
        started: list[float] = []

        def work() -> np.ndarray:
            started.append(time.perf_counter())
            return decode_image(image, max_pixels=self.args.max_pixels)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoder, work)
        except SegmentationError as exc:
            self.metrics.reject(exc.code)
            raise
        finally:
            if started:  # time waiting for a thread and decoding, apart
                self.metrics.stage("decode_wait", started[0] - submitted)
                self.metrics.stage("decode", time.perf_counter() - started[0])

    async def submit(self, frame: np.ndarray, options: Any, deadline: float | None) -> Any:
        """Queue one decoded frame for batching; raise its error, if it got one."""
        if deadline is not None and time.time() > deadline:
            self.metrics.reject("deadline")
            raise DeadlineExceededError("the request deadline passed before it was queued")
        result = await self.batched(Pending(frame, options, time.monotonic(), deadline))
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
            return await self.submit(await self.decode(image), options, deadline)

        return list(await asyncio.gather(*(one(i) for i in images), return_exceptions=True))

    async def process_batch(self, items: list[Pending]) -> list[Any]:
        """Body of the ``@serve.batch`` method: hand the batch to the GPU queue.

        ``@serve.batch`` forms its next batch while the previous one still runs, so under a
        model slower than the batch window it emits many small batches that then wait in
        line. Batches waiting here are merged (up to the live cap) before each GPU call, so
        the model sees full batches however the window was cut.
        """
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                groups = [self._waiting.popleft()]
                count = len(groups[0][0])
                while self._waiting and count + len(self._waiting[0][0]) <= max(1, self.cap.value):
                    groups.append(self._waiting.popleft())
                    count += len(groups[-1][0])
                merged = [item for group, _ in groups for item in group]
                try:
                    results = await self._run_merged(merged)
                except Exception as exc:
                    for _, future in groups:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                offset = 0
                for group, future in groups:
                    if not future.done():
                        future.set_result(results[offset : offset + len(group)])
                    offset += len(group)
        finally:
            self._drain_task = None

    async def _run_merged(self, items: list[Pending]) -> list[Any]:
        """Drop expired frames, run the rest OOM-safely on the GPU thread."""
        now, wall = time.monotonic(), time.time()
        results: list[Any] = [None] * len(items)
        live: list[int] = []
        for index, item in enumerate(items):
            self.metrics.stage("queue", now - item.enqueued)
            if item.deadline is not None and wall > item.deadline:
                self.metrics.reject("deadline")
                results[index] = DeadlineExceededError(
                    "the request deadline passed while it waited for the GPU"
                )
            else:
                live.append(index)
        if live:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            steps: dict[str, float] = {}
            self.step_timings = steps
            try:
                outputs, report = await loop.run_in_executor(
                    self._gpu, self.runner, [items[i] for i in live]
                )
            finally:
                self.step_timings = None
            self.metrics.stage("model", time.perf_counter() - started)
            for step, seconds in steps.items():
                self.metrics.stage(f"model:{step}", seconds)
            self.metrics.batch_size.observe(float(len(live)))
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, report.largest_run)
            if report.oom_splits:
                self.metrics.oom_splits.inc(report.oom_splits)
                self.oom_splits += report.oom_splits
            if report.failed_frames:
                self.metrics.reject("oom")
            for index, output in zip(live, outputs, strict=True):
                results[index] = output
            self.metrics.frames.inc(len(live) - report.failed_frames, tags={"outcome": "ok"})
            recomputed = getattr(self.segmentor, "fp32_recomputed", 0)
            if recomputed > self._fp32_reported:
                self.metrics.fp32_fallbacks.inc(recomputed - self._fp32_reported)
                self._fp32_reported = recomputed
            self.metrics.memory(gpu_memory(self.device))
            self._sync_batch_size()
        return results

    # -- introspection ------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Model source, precision, batch settings and memory of this replica."""
        return {
            **self.segmentor.info().as_dict(),
            "batch": {
                **self.batch_config.model_dump(),
                "live_cap": self.cap.value,
                "memory_cap": self.memory_cap,
                "batch_sizes": list(self.segmentor.batch_buckets or ()),
                "cuda_graph_batch_sizes": getattr(self.segmentor, "graph_batch_sizes", []),
                "cuda_graph_error": getattr(self.segmentor, "graph_error", None),
                "batches_run": self.batches_run,
                "largest_batch": self.largest_batch,
                "fp32_recomputed_frames": self._fp32_reported,
                "oom_splits": self.oom_splits,
            },
            "stages": self.metrics.totals.summary(),
            "gpu_memory": {**gpu_memory(self.device), "fraction": self.memory_fraction},
            "gpu": _gpu_identity(self.device),
            "pid": os.getpid(),
        }

    async def check_health(self) -> None:
        """Touch the model's device: a broken CUDA context fails the health check."""

        def touch() -> None:
            probe = torch.ones(8, device=self.device).sum()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if float(probe) != 8.0:
                raise RuntimeError(f"device {self.device} returned a wrong result")

        await asyncio.get_running_loop().run_in_executor(self._gpu, touch)


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


def _oom_above(run: Callable[[list[Pending]], list[Any]], limit: int) -> Callable[..., list[Any]]:
    """``run`` that fails like a full GPU on batches larger than ``limit`` (fault injection)."""

    def faulty(items: list[Pending]) -> list[Any]:
        if len(items) > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected: batch {len(items)} > {limit})"
            )
        return run(items)

    return faulty
