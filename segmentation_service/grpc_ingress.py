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
Timeout-Ms`` over HTTP). It counts from the call's arrival and bounds the whole call at the
router, as over HTTP: DEADLINE_EXCEEDED when it passes, wherever the call is; the models drop
frames whose deadline passed while they were queued. A value that is not 1 to
``MAX_TIMEOUT_MS`` is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from ray.serve import Deployment
from ray.serve.grpc_util import RayServegRPCContext

from segmentation.errors import (
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    SegmentationError,
)
from segmentation.imaging import EncodedOutput
from segmentation.options import CutoutOptions, DetectOptions, ImageFormat, Output
from segmentation_client.proto import segmentor_pb2 as pb
from segmentation_service.deadlines import Deadline, parse_timeout_ms
from segmentation_service.errors import grpc_status, unwrap
from segmentation_service.router import (
    Router,
    check_no_cutout_options,
    checked_options,
    frame_cutout_box,
    product_cutout_options,
)

if TYPE_CHECKING:
    _RouterBase = Router
else:
    _RouterBase = object

logger = logging.getLogger("ray.serve")
Reply = TypeVar("Reply")

_OUTPUT_NAMES: dict[int, Output] = {pb.RGBA_PNG: "rgba", pb.MATTE_PNG: "mask", pb.RAW_ALPHA: "raw"}
_IMAGE_TYPES: dict[int, ImageFormat] = {pb.PNG: "png", pb.WEBP: "webp", pb.JPEG: "jpeg"}


def detect_options(message: pb.DetectOptions) -> DetectOptions:
    """The HTTP query's validation for the proto's options; unset fields take the defaults."""
    return checked_options(
        message.conf if message.HasField("conf") else 0.25,
        message.iou if message.HasField("iou") else 0.7,
        message.max_det if message.HasField("max_det") else 300,
        tuple(message.classes),
    )


def cutout_options(message: pb.CutoutOptions, output: int) -> CutoutOptions:
    """The HTTP query's cutout options (same parsing, defaults and 422s) from the proto's;
    unset fields take the defaults, so an unset message is the plain cutout."""
    if message.format not in _IMAGE_TYPES:
        raise InvalidRequestError(f"cutout.format={message.format}: not an ImageType")
    options = product_cutout_options(
        refine=message.refine,
        background=message.background or None,
        crop=message.crop,
        crop_margin=message.crop_margin or "0",
        format=_IMAGE_TYPES[message.format],
        quality=message.quality if message.HasField("quality") else 90,
        lossless=message.lossless,
    )
    return dataclasses.replace(options, output=output_name(output))


def request_cutout(request: pb.FramesRequest) -> CutoutOptions:
    """What each frame of a Frames request is composed as: the plain cutout to segment,
    which takes no cutout options (INVALID_ARGUMENT when the message sets any)."""
    if request.task == pb.TASK_SEGMENT:
        check_no_cutout_options(cutout_options(request.cutout, pb.RGBA_PNG), "segment")
        return CutoutOptions()
    return cutout_options(request.cutout, request.output)


def image_reply(
    output: pb.OutputFormat, answer: EncodedOutput, options: CutoutOptions
) -> pb.ImageReply:
    """A cutout, matte or raw matte as the proto's reply."""
    box = frame_cutout_box(answer, options)
    return pb.ImageReply(
        format=output,
        data=answer.data,
        width=answer.width,
        height=answer.height,
        media_type="" if options.output == "raw" else answer.media_type,
        cutout_box=box or [],
    )


def request_deadline(context: RayServegRPCContext, arrived: float) -> Deadline:
    """The call's deadline from ``x-request-timeout-ms`` metadata, counted from its arrival
    (unbounded when not sent); 422-like INVALID_ARGUMENT for a value that is not 1 to
    ``MAX_TIMEOUT_MS``; DEADLINE_EXCEEDED at once when it has passed."""
    value = dict(context.invocation_metadata()).get("x-request-timeout-ms")
    deadline = Deadline.after(arrived, parse_timeout_ms(value))
    deadline.remaining()
    return deadline


def output_name(output: int) -> Output:
    if output not in _OUTPUT_NAMES:
        raise InvalidRequestError(f"output={output}: not an OutputFormat")
    return _OUTPUT_NAMES[output]


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
        async def work(deadline: Deadline) -> pb.ImageReply:
            options = cutout_options(request.cutout, request.output)
            data = self._one_message_image(request.image)
            async with self._one_image(data, deadline, lambda: options) as image:
                answer = await self._call(
                    self.rmbg.remove_background, image, options, deadline.at, deadline=deadline
                )
            return image_reply(request.output, answer, options)

        return await self._answer("RemoveBackground", grpc_context, pb.ImageReply(), work)

    async def Segment(
        self, request: pb.SegmentRequest, grpc_context: RayServegRPCContext
    ) -> pb.SegmentReply:
        async def work(deadline: Deadline) -> pb.SegmentReply:
            options = detect_options(request.options)
            self._check_max_det(options)
            async with self._one_image(self._one_message_image(request.image), deadline) as image:
                result = await self._call(
                    self.yolo.segment, image, options, deadline.at, deadline=deadline
                )
            return segment_reply(result)

        return await self._answer("Segment", grpc_context, pb.SegmentReply(), work)

    async def Frames(
        self, request: pb.FramesRequest, grpc_context: RayServegRPCContext
    ) -> pb.FramesReply:
        async def work(deadline: Deadline) -> pb.FramesReply:
            frames, cutout = self._checked_frames(request)
            with self.body_bytes.account() as charge:
                charge(sum(len(f) for f in frames))
                probed = await self._probe_all(frames)
                with self._admit_all(probed, cutout):
                    replies = await self._frame_replies(request, cutout, probed, 0, deadline)
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
        arrived = time.time()
        try:
            self._authorize_call(grpc_context)
            deadline = request_deadline(grpc_context, arrived)
            frames, cutout = self._checked_frames(request)
            with self.body_bytes.account() as charge:
                charge(sum(len(f) for f in frames))
                probed = await self._probe_all(frames)
                with self._admit_all(probed, cutout):
                    size = self.args.frames_per_call
                    calls = [
                        asyncio.ensure_future(
                            self._frame_replies(
                                request, cutout, probed[start : start + size], start, deadline
                            )
                        )
                        for start in range(0, len(probed), size)
                    ]
                    try:
                        for call in calls:
                            for reply in await call:
                                yield reply
                    finally:
                        for call in calls:
                            call.cancel()
                        await asyncio.gather(*calls, return_exceptions=True)
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
        work: Callable[[Deadline], Awaitable[Reply]],
    ) -> Reply:
        """Run ``work`` after the API key check, within the call's deadline; a typed error
        becomes the call's status (returned with an empty reply, so Serve sends the trailing
        metadata too)."""
        started = time.perf_counter()
        arrived = time.time()
        try:
            self._authorize_call(context)
            deadline = request_deadline(context, arrived)
            return await deadline.bound(work(deadline))
        except Exception as exc:
            error = unwrap(exc)
            if not isinstance(error, SegmentationError):
                raise
            set_error(context, error)
            return empty
        finally:
            self.stages.add(f"grpc:{method}", time.perf_counter() - started)

    def _authorize_call(self, context: RayServegRPCContext) -> None:
        """``authorization: Bearer <key>`` metadata, when the service has an API key."""
        self.authorize(dict(context.invocation_metadata()).get("authorization", ""))

    def _one_message_image(self, data: bytes) -> bytes:
        if not data:
            raise InvalidImageError("empty image: send the encoded image bytes")
        if len(data) > self.args.max_body_bytes:
            raise PayloadTooLargeError(
                f"image of {len(data)} bytes is over the limit of {self.args.max_body_bytes}"
            )
        return data

    def _checked_frames(self, request: pb.FramesRequest) -> tuple[list[bytes], CutoutOptions]:
        """The request's frames within the same limits as a multipart body, and what each is
        composed as (:func:`request_cutout`)."""
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
            self._check_max_det(detect_options(request.options))
        return frames, request_cutout(request)

    async def _frame_replies(
        self,
        request: pb.FramesRequest,
        cutout: CutoutOptions,
        probed: Sequence[Any],
        first_index: int,
        deadline: Deadline,
    ) -> list[pb.FrameReply]:
        """One reply per frame, in order; a frame that failed carries its own error."""
        segment = request.task == pb.TASK_SEGMENT
        results = await self._run_each(
            list(probed),
            "segment" if segment else "remove-background",
            cutout,
            detect_options(request.options),
            deadline,
        )
        replies = []
        for index, result in enumerate(results, first_index):
            if isinstance(result, BaseException):
                error = unwrap(result)
                if not isinstance(error, SegmentationError):
                    raise error
                replies.append(frame_error(index, error))
            elif segment:
                replies.append(pb.FrameReply(index=index, segmentation=segment_reply(result)))
            else:
                reply = image_reply(request.output, result, cutout)
                replies.append(pb.FrameReply(index=index, matte=reply))
        return replies


_HttpRouter: Any = cast(Deployment, Router).func_or_class


class GrpcRouter(SegmentorServicer, _HttpRouter):
    """The router deployment's class: the HTTP routes of :class:`Router` and the gRPC
    methods of :class:`SegmentorServicer`."""


#: The ``Router`` deployment (same name and defaults) serving HTTP and gRPC.
IngressRouter = cast(Deployment, Router).options(func_or_class=GrpcRouter)
