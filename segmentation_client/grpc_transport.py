"""The gRPC transport of the client (``grpc://host:9000`` URLs); needs the ``grpc`` extra.

Imported only when a client is given a grpc:// URL, so the base install works without grpcio.
It keeps the HTTP client's contract: the same typed results, the same retries (an overloaded
service answers RESOURCE_EXHAUSTED with ``retry-after`` trailing metadata, as 503 with
Retry-After; UNAVAILABLE is retried like a refused connection), one overall deadline per call
across all retries, and :class:`ServiceError` with the gRPC code name as ``status``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

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
        from segmentation_client.client import ServiceError

        self.client = client
        self.target = grpc_target(client.base_url)
        self.error_type = ServiceError

    def metadata(self, remaining_s: float) -> list[tuple[str, str]]:
        # The service drops frames past this deadline (Serve does not pass the gRPC one on).
        metadata = [("x-request-timeout-ms", str(max(1, int(remaining_s * 1000))))]
        if self.client.api_key:
            metadata.append(("authorization", f"Bearer {self.client.api_key}"))
        return metadata

    def error(self, err: grpc.RpcError) -> Exception:
        code = err.code()
        service_code = trailing(err).get("error-code", code.name.lower())
        return self.error_type(code.name, service_code, err.details() or "")

    def expired(self) -> Exception:
        return self.error_type(
            "DEADLINE_EXCEEDED",
            "deadline_exceeded",
            f"no answer within the client's timeout of {self.client.timeout_s} s",
        )

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

    def image(self, reply: pb.ImageReply) -> Any:
        from segmentation_client.client import Image

        return Image(reply.data, "image/png")

    def segmentation(self, reply: pb.SegmentReply) -> Any:
        from segmentation_client.client import Instance, Segmentation

        instances = []
        for inst in reply.instances:
            x1, y1, x2, y2 = inst.box
            rle = {"size": list(inst.mask.size), "counts": inst.mask.counts}
            instances.append(
                Instance((x1, y1, x2, y2), inst.score, inst.class_id, inst.class_name, rle)
            )
        return Segmentation(reply.width, reply.height, reply.model, instances)

    def frame(self, reply: pb.FrameReply) -> Any:
        from segmentation_client.client import FrameError

        kind = reply.WhichOneof("result")
        if kind == "error":
            return FrameError(reply.index, reply.error.code, reply.error.message)
        if kind == "segmentation":
            return self.segmentation(reply.segmentation)
        return self.image(reply.matte)

    def frames_request(
        self, data: list[bytes], task: str, output: str, options: pb.DetectOptions
    ) -> pb.FramesRequest:
        return pb.FramesRequest(
            frames=data, task=TASKS[task], output=OUTPUTS[output], options=options
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
        deadline = time.monotonic() + self.client.timeout_s
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.expired()
            try:
                with self.slots:
                    return rpc(request, timeout=remaining, metadata=self.metadata(remaining))
            except grpc.RpcError as err:
                wait = self.next_wait(attempt, err, deadline)
                if wait is None:
                    raise self.error(err) from None
            time.sleep(wait)


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
        deadline = time.monotonic() + self.client.timeout_s
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.expired()
            try:
                async with self.slots:
                    return await rpc(request, timeout=remaining, metadata=self.metadata(remaining))
            except grpc.RpcError as err:
                wait = self.next_wait(attempt, err, deadline)
                if wait is None:
                    raise self.error(err) from None
            await asyncio.sleep(wait)
