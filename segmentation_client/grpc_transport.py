"""The gRPC transport of the client (``grpc://host:9000`` URLs); needs the ``grpc`` extra.

Imported only when a client is given a grpc:// URL, so the base install works without grpcio.
It keeps the HTTP client's contract: the same typed results, the same retries (an overloaded
service answers RESOURCE_EXHAUSTED with ``retry-after`` trailing metadata, as 503 with
Retry-After; UNAVAILABLE is retried like a refused connection), one overall deadline per call
across all retries (the wait for a free slot included), and :class:`ServiceError` with the
gRPC code name as ``status``: :class:`ServiceTimeout` for ``DEADLINE_EXCEEDED``,
:class:`ServiceUnreachable` for a channel that cannot connect or a connection lost. Until the
service has answered once, a call first waits up to ``connect_timeout_s`` for the channel to
connect, so a wrong address fails in seconds rather than at the call's deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from segmentation_client.client import (
    FrameError,
    Image,
    Instance,
    Segmentation,
    ServiceError,
    ServiceTimeout,
    answer_error,
    timeout_error,
    unreachable_error,
)
from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_client.proto.segmentor_pb2_grpc import SegmentorStub

OUTPUTS = {"rgba": pb.RGBA_PNG, "mask": pb.MATTE_PNG}
TASKS = {"remove-background": pb.TASK_REMOVE_BACKGROUND, "segment": pb.TASK_SEGMENT}


def grpc_target(url: str) -> str:
    """``host:port`` of a ``grpc://host:port`` URL."""
    target = url.removeprefix("grpc://").rstrip("/")
    if not target or "/" in target:
        raise ValueError(f"{url!r}: expected grpc://host:port")
    return target


def detect_options(
    conf: float | None, iou: float | None, classes: Sequence[int] | None, max_det: int | None
) -> pb.DetectOptions:
    options = pb.DetectOptions(classes=list(classes or ()))
    if conf is not None:
        options.conf = conf
    if iou is not None:
        options.iou = iou
    if max_det is not None:
        options.max_det = max_det
    return options


IMAGE_TYPES = {"png": pb.PNG, "webp": pb.WEBP, "jpeg": pb.JPEG}


def cutout_options(
    refine: bool | None = None,
    background: str | None = None,
    crop: bool | None = None,
    crop_margin: str | int | None = None,
    format: str | None = None,
    quality: int | None = None,
    lossless: bool | None = None,
) -> pb.CutoutOptions:
    """The cutout options as the proto's message (None: the service's default); the values
    are those of the HTTP query (``background`` already a string)."""
    if format is not None and format not in IMAGE_TYPES:
        raise ValueError(f"format={format!r}: expected one of {', '.join(IMAGE_TYPES)}")
    options = pb.CutoutOptions(
        refine=bool(refine),
        background=background or "",
        crop=bool(crop),
        crop_margin="" if crop_margin is None else str(crop_margin),
        format=IMAGE_TYPES[format or "png"],
        lossless=bool(lossless),
    )
    if quality is not None:
        options.quality = quality
    return options


def trailing(err: grpc.RpcError) -> dict[str, str]:
    """Trailing metadata of a failed call as a dict (empty when there is none)."""
    metadata = getattr(err, "trailing_metadata", lambda: None)()
    return {str(k): v if isinstance(v, str) else v.decode() for k, v in metadata or ()}


def retry_after(err: grpc.RpcError) -> str | None:
    """The retry delay the service asked for, when the failure is worth retrying; ``""`` for
    an unreachable service (back off), None when retrying cannot help."""
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Without retry-after it is a request over a size limit: retrying cannot help.
        return trailing(err).get("retry-after")
    return None


class _Common:
    """What the sync and async transports share: metadata, retries, deadlines, parsing."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.target = grpc_target(client.base_url)
        #: Whether the channel has connected once (see the client's ``connect_timeout_s``).
        self.reached = False

    def metadata(self, remaining_s: float) -> list[tuple[str, str]]:
        # The service drops frames past this deadline (Serve does not pass the gRPC one on).
        metadata = [("x-request-timeout-ms", str(max(1, int(remaining_s * 1000))))]
        if self.client.api_key:
            metadata.append(("authorization", f"Bearer {self.client.api_key}"))
        return metadata

    def where(self, method: str) -> str:
        return f"{self.client.base_url}/{method}"

    def error(self, method: str, err: grpc.RpcError) -> ServiceError:
        """The error of a failed call: the service's answer, or none (a deadline that passed,
        a connection that failed), told apart by the service's ``error-code`` trailer."""
        code = err.code()
        service_code = trailing(err).get("error-code")
        if service_code is None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return timeout_error(code.name, self.where(method), self.client.timeout_s)
        if service_code is None and code == grpc.StatusCode.UNAVAILABLE:
            return unreachable_error(code.name, self.client.base_url, err.details() or code.name)
        return answer_error(code.name, service_code or code.name.lower(), err.details() or "")

    def expired(self, method: str, why: str = "") -> ServiceTimeout:
        return timeout_error("DEADLINE_EXCEEDED", self.where(method), self.client.timeout_s, why)

    def busy(self, method: str) -> ServiceTimeout:
        slots = self.client.max_concurrency
        return self.expired(method, f" (all {slots} slots of max_concurrency stayed busy)")

    def remaining(self, method: str, deadline: float) -> float:
        """Seconds left before ``deadline``; raises :class:`ServiceTimeout` when none are."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self.expired(method)
        return remaining

    def connect_limit(self, started: float, deadline: float) -> float:
        """When waiting for the channel's first connection gives up."""
        return min(deadline, started + self.client.connect_timeout_s)

    def not_connected(self, method: str, started: float, deadline: float) -> ServiceError:
        """The error of a channel that did not connect in time: unreachable after
        ``connect_timeout_s``, a timeout when the call's deadline cut the wait short."""
        if self.connect_limit(started, deadline) == deadline:
            return self.expired(method)
        waited = self.client.connect_timeout_s
        why = f"no connection within {waited:g} s (is the service's gRPC port right?)"
        return unreachable_error("UNAVAILABLE", self.client.base_url, why)

    def next_wait(self, attempt: int, err: grpc.RpcError, deadline: float) -> float | None:
        """Seconds to wait before the next try; None to give up and raise."""
        asked = retry_after(err)
        if asked is None or attempt >= self.client.retry.attempts:
            return None
        wait: float = self.client.retry.wait(attempt, asked or None)
        if time.monotonic() + wait >= deadline:
            return None
        self.client.retries += 1
        return wait

    def image(self, reply: pb.ImageReply) -> Image:
        default = "application/octet-stream" if reply.format == pb.RAW_ALPHA else "image/png"
        box = tuple(reply.cutout_box)
        return Image(
            reply.data,
            reply.media_type or default,
            cutout_box=(box[0], box[1], box[2], box[3]) if len(box) == 4 else None,
        )

    def segmentation(self, reply: pb.SegmentReply) -> Segmentation:
        instances = []
        for inst in reply.instances:
            x1, y1, x2, y2 = inst.box
            rle = {"size": list(inst.mask.size), "counts": inst.mask.counts}
            instances.append(
                Instance((x1, y1, x2, y2), inst.score, inst.class_id, inst.class_name, rle)
            )
        return Segmentation(reply.width, reply.height, reply.model, instances)

    def frame(self, reply: pb.FrameReply) -> Image | Segmentation | FrameError:
        kind = reply.WhichOneof("result")
        if kind == "error":
            return FrameError(reply.index, reply.error.code, reply.error.message)
        if kind == "segmentation":
            return self.segmentation(reply.segmentation)
        return self.image(reply.matte)

    def frames_request(
        self,
        data: list[bytes],
        task: str,
        output: str,
        options: pb.DetectOptions,
        cutout: pb.CutoutOptions | None = None,
    ) -> pb.FramesRequest:
        return pb.FramesRequest(
            frames=data, task=TASKS[task], output=OUTPUTS[output], options=options, cutout=cutout
        )


class GrpcTransport(_Common):
    """Blocking calls on one channel; at most ``max_concurrency`` in flight."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = SegmentorStub(self.channel)
        self.slots = threading.BoundedSemaphore(client.max_concurrency)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any) -> Any:
        started = time.monotonic()
        deadline = started + self.client.timeout_s
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            attempt += 1
            self.connect(method, started, deadline)
            if not self.slots.acquire(timeout=self.remaining(method, deadline)):
                raise self.busy(method)
            try:
                remaining = self.remaining(method, deadline)
                return rpc(request, timeout=remaining, metadata=self.metadata(remaining))
            except grpc.RpcError as err:
                wait = self.next_wait(attempt, err, deadline)
                if wait is None:
                    raise self.error(method, err) from err
            finally:
                self.slots.release()
            time.sleep(wait)

    def connect(self, method: str, started: float, deadline: float) -> None:
        """Until the channel has connected once, wait for it (``connect_timeout_s`` at most)."""
        if self.reached:
            return
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=max(0.0, self.connect_limit(started, deadline) - time.monotonic()))
        except grpc.FutureTimeoutError as exc:
            raise self.not_connected(method, started, deadline) from exc
        finally:
            ready.cancel()
        self.reached = True


class AsyncGrpcTransport(_Common):
    """grpc.aio calls on one channel, opened lazily in the running event loop."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.channel: grpc.aio.Channel | None = None
        self.slots = asyncio.Semaphore(client.max_concurrency)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def call(self, method: str, request: Any) -> Any:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.target)
            self.stub = SegmentorStub(self.channel)
        started = time.monotonic()
        deadline = started + self.client.timeout_s
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            attempt += 1
            await self.connect(self.channel, method, started, deadline)
            try:
                async with asyncio.timeout(self.remaining(method, deadline)):
                    await self.slots.acquire()
            except TimeoutError:
                raise self.busy(method) from None
            try:
                remaining = self.remaining(method, deadline)
                return await rpc(request, timeout=remaining, metadata=self.metadata(remaining))
            except grpc.RpcError as err:
                wait = self.next_wait(attempt, err, deadline)
                if wait is None:
                    raise self.error(method, err) from err
            finally:
                self.slots.release()
            await asyncio.sleep(wait)

    async def connect(
        self, channel: grpc.aio.Channel, method: str, started: float, deadline: float
    ) -> None:
        """Until the channel has connected once, wait for it (``connect_timeout_s`` at most)."""
        if self.reached:
            return
        limit = self.connect_limit(started, deadline)
        try:
            await asyncio.wait_for(channel.channel_ready(), max(0.0, limit - time.monotonic()))
        except TimeoutError as exc:
            raise self.not_connected(method, started, deadline) from exc
        self.reached = True
