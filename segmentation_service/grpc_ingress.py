"""The gRPC API (``segmentation_client/proto/segmentor.proto``) on the router deployment.

Ray Serve's gRPC proxy sends each call to the ingress deployment of the application, to the
method named like the RPC. The HTTP proxy calls the same ingress through its FastAPI app, so
one deployment class serves both: :class:`GrpcRouter` is the HTTP :class:`Router` with the
gRPC methods added. That keeps one application (no ``application`` metadata for clients to
send, ``serve_config.yaml`` and ``deployments: - name: Router`` unchanged) and one frame budget
for both protocols: admission counts HTTP and gRPC frames together. A second application with
its own ingress would need cross-application handles and a budget of its own.

The methods reuse the router's decoding, budget and model calls, so the behaviour is that of
HTTP; only the envelope differs. Errors go back the gRPC way (``errors.GRPC_STATUS``): the code
and message on the call, ``error-code`` (the service's code, e.g. ``invalid_image``) and, for
overload, ``retry-after`` (seconds) in the trailing metadata. Like the router, this module
never imports torch: the router processes hold no model.

Deadlines: Serve's gRPC context does not carry the caller's deadline to the replica, so the
client sends ``x-request-timeout-ms`` metadata beside its gRPC deadline (as ``X-Request-
Timeout-Ms`` over HTTP); the models drop frames whose deadline passed. When the gRPC deadline
passes first, the proxy cancels the call and the client sees DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import numpy as np
from ray.serve import Deployment
from ray.serve.grpc_util import RayServegRPCContext

from segmentation.errors import (
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    SegmentationError,
)
from segmentation.options import DetectOptions
from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_service.errors import UnauthorizedError, grpc_status, unwrap
from segmentation_service.router import Router

if TYPE_CHECKING:
    _RouterBase = Router
else:
    _RouterBase = object

logger = logging.getLogger("ray.serve")
Reply = TypeVar("Reply")

_OUTPUT_NAMES: dict[int, str] = {pb.RGBA_PNG: "rgba", pb.MATTE_PNG: "mask"}


def detect_options(message: pb.DetectOptions) -> DetectOptions:
    """The HTTP query's validation for the proto's options; unset fields take the defaults."""
    conf = message.conf if message.HasField("conf") else 0.25
    iou = message.iou if message.HasField("iou") else 0.7
    max_det = message.max_det if message.HasField("max_det") else 300
    problems = [
        f"{name}={value}: must be between {low} and {high}"
        for name, value, low, high in (
            ("conf", conf, 0.0, 1.0),
            ("iou", iou, 0.0, 1.0),
            ("max_det", max_det, 1, 1000),
        )
        if not low <= value <= high
    ]
    if any(c < 0 for c in message.classes):
        problems.append("classes must be non-negative integers")
    if problems:
        raise InvalidRequestError("; ".join(problems))
    classes = tuple(message.classes) or None
    return DetectOptions(conf=conf, iou=iou, classes=classes, max_det=max_det)


def request_deadline(context: RayServegRPCContext) -> float | None:
    """Wall-clock deadline from ``x-request-timeout-ms`` metadata (None when not sent)."""
    value = dict(context.invocation_metadata()).get("x-request-timeout-ms")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidRequestError(f"x-request-timeout-ms={value!r}: expected a positive integer")
    return time.time() + int(value) / 1000.0


def check_output(output: int) -> None:
    if output not in pb.OutputFormat.values():
        raise InvalidRequestError(f"output={output}: not an OutputFormat")


def set_error(context: RayServegRPCContext, exc: SegmentationError) -> None:
    """The call's status, message and trailing metadata for ``exc``."""
    context.set_code(grpc.StatusCode[grpc_status(exc)])
    context.set_details(exc.message)
    trailing = [("error-code", exc.code)]
    if exc.retry_after_s:
        trailing.append(("retry-after", str(exc.retry_after_s)))
    context.set_trailing_metadata(trailing)


def frame_error(index: int, exc: SegmentationError) -> pb.FrameReply:
    error = pb.FrameError(status=grpc_status(exc), code=exc.code, message=exc.message)
    return pb.FrameReply(index=index, error=error)


def segment_reply(result: dict[str, Any]) -> pb.SegmentReply:
    """The replica's segment result (the HTTP JSON) as a proto message."""
    return pb.SegmentReply(
        width=result["width"],
        height=result["height"],
        model=result.get("model", ""),
        instances=[
            pb.Instance(
                box=inst["box"],
                score=inst["score"],
                class_id=inst["class_id"],
                class_name=inst["class_name"],
                mask=pb.Rle(size=inst["mask"]["size"], counts=inst["mask"]["counts"]),
            )
            for inst in result["instances"]
        ],
    )


class SegmentorServicer(_RouterBase):
    """The ``productsegmentor.v1.Segmentor`` methods, on top of the router's helpers."""

    async def RemoveBackground(
        self, request: pb.ImageRequest, grpc_context: RayServegRPCContext
    ) -> pb.ImageReply:
        async def work() -> pb.ImageReply:
            check_output(request.output)
            with self.budget.admit(1):
                frame = await self._decode(self._one_image(request.image))
                alpha = await self._call(
                    self.rmbg.remove_background, frame, request_deadline(grpc_context)
                )
                return await self._matte_reply(frame, alpha, request.output)

        return await self._answer("RemoveBackground", grpc_context, pb.ImageReply(), work)

    async def Segment(
        self, request: pb.SegmentRequest, grpc_context: RayServegRPCContext
    ) -> pb.SegmentReply:
        async def work() -> pb.SegmentReply:
            options = detect_options(request.options)
            with self.budget.admit(1):
                frame = await self._decode_for_yolo(self._one_image(request.image))
                result = await self._call(
                    self.yolo.segment, frame, options, request_deadline(grpc_context)
                )
                return segment_reply(result)

        return await self._answer("Segment", grpc_context, pb.SegmentReply(), work)

    async def Frames(
        self, request: pb.FramesRequest, grpc_context: RayServegRPCContext
    ) -> pb.FramesReply:
        async def work() -> pb.FramesReply:
            frames = self._checked_frames(request)
            with self.budget.admit(len(frames)):
                replies = await self._frame_replies(
                    request, frames, 0, request_deadline(grpc_context)
                )
            failed = sum(reply.HasField("error") for reply in replies)
            return pb.FramesReply(
                task=request.task, count=len(replies), failed=failed, frames=replies
            )

        return await self._answer("Frames", grpc_context, pb.FramesReply(), work)

    async def StreamFrames(
        self, request: pb.FramesRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.FrameReply]:
        """Frames in calls of ``frames_per_call``, all started at once, answered in order as
        each call completes. A refusal (auth, size, overload) ends the stream before its first
        reply with the same status as Frames; Serve's proxy drops trailing metadata on a
        stream's error, so there the retry delay is only in the message."""
        started = time.perf_counter()
        try:
            self._authorize(grpc_context)
            frames = self._checked_frames(request)
            deadline = request_deadline(grpc_context)
            with self.budget.admit(len(frames)):
                size = self.args.frames_per_call
                calls = [
                    asyncio.ensure_future(
                        self._frame_replies(request, frames[start : start + size], start, deadline)
                    )
                    for start in range(0, len(frames), size)
                ]
                try:
                    for call in calls:
                        for reply in await call:
                            yield reply
                finally:
                    for call in calls:
                        call.cancel()
        except SegmentationError as exc:
            # Raised with the code set: Serve answers the stream with that code.
            set_error(grpc_context, exc)
            raise
        finally:
            self.stages.add("grpc:StreamFrames", time.perf_counter() - started)

    # -- helpers ----------------------------------------------------------------------
    async def _answer(
        self,
        method: str,
        context: RayServegRPCContext,
        empty: Reply,
        work: Callable[[], Awaitable[Reply]],
    ) -> Reply:
        """Run ``work`` after the API key check; a typed error becomes the call's status
        (returned with an empty reply, so Serve sends the trailing metadata too)."""
        started = time.perf_counter()
        try:
            self._authorize(context)
            return await work()
        except Exception as exc:
            error = unwrap(exc)
            if not isinstance(error, SegmentationError):
                raise
            set_error(context, error)
            return empty
        finally:
            self.stages.add(f"grpc:{method}", time.perf_counter() - started)

    def _authorize(self, context: RayServegRPCContext) -> None:
        """``authorization: Bearer <key>`` metadata, when the service has an API key."""
        if self.api_key is None:
            return
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            raise UnauthorizedError(
                "missing or wrong API key: send metadata 'authorization: Bearer <key>'"
            )

    def _one_image(self, data: bytes) -> bytes:
        if not data:
            raise InvalidImageError("empty image: send the encoded image bytes")
        if len(data) > self.args.max_body_bytes:
            raise PayloadTooLargeError(
                f"image of {len(data)} bytes is over the limit of {self.args.max_body_bytes}"
            )
        return data

    def _checked_frames(self, request: pb.FramesRequest) -> list[bytes]:
        """The request's frames within the same limits as a multipart body."""
        frames = list(request.frames)
        if not frames:
            raise InvalidRequestError("the request has no frames")
        if len(frames) > self.args.max_frames_per_request:
            raise PayloadTooLargeError(
                f"{len(frames)} frames; the limit is {self.args.max_frames_per_request}"
            )
        total = sum(len(f) for f in frames)
        if total > self.args.max_body_bytes:
            raise PayloadTooLargeError(
                f"frames of {total} bytes in all are over the limit of {self.args.max_body_bytes}"
            )
        # A bad option fails the call, not each frame.
        if request.task == pb.TASK_SEGMENT:
            detect_options(request.options)
        else:
            check_output(request.output)
        return frames

    async def _frame_replies(
        self,
        request: pb.FramesRequest,
        files: Sequence[bytes],
        first_index: int,
        deadline: float | None,
    ) -> list[pb.FrameReply]:
        """One reply per file, in order; a frame that failed carries its own error."""
        if request.task == pb.TASK_SEGMENT:
            results = await self._segment_each(
                list(files), detect_options(request.options), deadline
            )
        else:
            frames = await asyncio.gather(*(self._decode(f) for f in files), return_exceptions=True)
            mattes = await self._in_calls(self.rmbg.remove_background_each, frames, deadline)
            results = await asyncio.gather(
                *(
                    self._matte_reply(frame, alpha, request.output)
                    for frame, alpha in zip(frames, mattes, strict=True)
                ),
                return_exceptions=True,
            )
        replies = []
        for index, result in enumerate(results, start=first_index):
            if isinstance(result, BaseException):
                error = unwrap(result)
                if not isinstance(error, SegmentationError):
                    raise error
                replies.append(frame_error(index, error))
            elif request.task == pb.TASK_SEGMENT:
                replies.append(pb.FrameReply(index=index, segmentation=segment_reply(result)))
            else:
                replies.append(pb.FrameReply(index=index, matte=result))
        return replies

    async def _matte_reply(self, frame: Any, alpha: Any, output: Any) -> pb.ImageReply:
        """The matte in the asked format; a failed frame's error is raised for its entry."""
        for failed in (frame, alpha):
            if isinstance(failed, BaseException):
                raise failed
        alpha = cast(np.ndarray, alpha)
        height, width = alpha.shape[:2]
        if output == pb.RAW_ALPHA:
            data = np.ascontiguousarray(alpha, dtype=np.uint8).tobytes()
        else:
            data = await self._encode_matte(frame, alpha, _OUTPUT_NAMES[output])
        return pb.ImageReply(format=output, data=data, width=width, height=height)


_HttpRouter: Any = cast(Deployment, Router).func_or_class


class GrpcRouter(SegmentorServicer, _HttpRouter):
    """The router deployment's class: the HTTP routes of :class:`Router` and the gRPC
    methods of :class:`SegmentorServicer`."""


#: The ``Router`` deployment (same name and defaults) serving HTTP and gRPC.
IngressRouter = cast(Deployment, Router).options(func_or_class=GrpcRouter)
