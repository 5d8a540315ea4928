"""The HTTP ingress: one FastAPI app that composes the two segmentor deployments."""

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from segmentation.encoders import b64, mask_png, rgba_png
from segmentation.errors import InvalidRequestError, SegmentationError
from segmentation.imaging import EncodedJPEG, decode_image, probe_jpeg
from segmentation.options import DetectOptions
from segmentation_service.admission import FrameBudget
from segmentation_service.config import RouterArgs
from segmentation_service.crops import crop_with_margin
from segmentation_service.errors import UnauthorizedError, error_body, install_handlers, unwrap
from segmentation_service.inputs import read_form_files, read_image
from segmentation_service.metrics import StageTotals
from segmentation_service.status import replica_counts

app = FastAPI(
    title="product-segmentor",
    version="0.1.0",
    description="Background removal (RMBG-2.0) and instance segmentation (YOLO11-seg) for "
    "product video frames.",
)
install_handlers(app)


@app.middleware("http")
async def _time_requests(request: Request, call_next: Any) -> Any:
    started = time.perf_counter()
    response = await call_next(request)
    router = getattr(request.app.state, "router", None)
    if router is not None:
        router.stages.add(request.url.path, time.perf_counter() - started)
    return response


T = TypeVar("T")
Conf = Annotated[float, Query(ge=0.0, le=1.0, description="Minimum detection score.")]
Iou = Annotated[float, Query(ge=0.0, le=1.0, description="NMS IoU threshold.")]
MaxDet = Annotated[int, Query(ge=1, le=1000, description="Most instances per frame.")]
Classes = Annotated[
    str | None, Query(description="Comma-separated class ids to keep, e.g. 0,39,41.")
]
Timeout = Annotated[
    int | None,
    Header(alias="X-Request-Timeout-Ms", ge=1, description="Drop the request after this long."),
]


def detect_options(
    conf: Conf = 0.25, iou: Iou = 0.7, max_det: MaxDet = 300, classes: Classes = None
) -> DetectOptions:
    parsed: tuple[int, ...] | None = None
    if classes:
        try:
            parsed = tuple(int(c) for c in classes.split(",") if c.strip())
        except ValueError:
            raise InvalidRequestError(
                f"classes={classes!r}: expected comma-separated integers, e.g. 0,39"
            ) from None
        if any(c < 0 for c in parsed):
            raise InvalidRequestError("classes must be non-negative integers")
    return DetectOptions(conf=conf, iou=iou, classes=parsed, max_det=max_det)


def deadline_of(timeout_ms: int | None) -> float | None:
    return None if timeout_ms is None else time.time() + timeout_ms / 1000.0


async def require_api_key(request: Request) -> None:
    router: Router = request.app.state.router
    expected = router.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), expected):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")


async def admit_one(request: Request) -> AsyncIterator[None]:
    """Hold one frame of the router's in-flight budget for the whole request (503 past it)."""
    router: Router = request.app.state.router
    with router.budget.admit(1):
        yield


Auth = Depends(require_api_key)
AdmitOne = Depends(admit_one)


@serve.deployment(max_ongoing_requests=256, max_queued_requests=512)
@serve.ingress(app)
class Router:
    """Routes HTTP requests to the RMBG-2.0 and YOLO11-seg deployments."""

    def __init__(
        self, rmbg: DeploymentHandle, yolo: DeploymentHandle, args: dict[str, Any] | None = None
    ) -> None:
        self.rmbg = rmbg
        self.yolo = yolo
        self.args = RouterArgs.model_validate(args or {})
        key = os.environ.get(self.args.api_key_env, "") if self.args.api_key_env else ""
        self.api_key: str | None = key or None
        self.stages = StageTotals()
        self.budget = FrameBudget(self.args.max_inflight_frames)
        # Image codecs run here, in the router processes, not in the GPU replicas: a GPU
        # replica whose threads fight for the GIL launches kernels slowly and forms small
        # batches. Scale CPU codec capacity with the number of router replicas.
        self._codec = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="codec")
        app.state.router = self

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Auth])
    async def models(self) -> dict[str, Any]:
        """Each model: source, revision, precision in use, batch settings, replicas, memory."""
        rmbg, yolo = await asyncio.gather(self.rmbg.info.remote(), self.yolo.info.remote())
        replicas = replica_counts()
        for info, deployment in ((rmbg, "RMBGDeployment"), (yolo, "YoloDeployment")):
            info["replicas"] = replicas.get(deployment)
        return {
            "models": [rmbg, yolo],
            "router": {
                "pid": os.getpid(),
                "requests": self.stages.summary(),
                "in_flight_frames": self.budget.in_flight,
                "rejected": self.budget.rejected,
            },
        }

    @app.post(
        "/v1/remove-background",
        dependencies=[Auth, AdmitOne],
        responses={200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    async def remove_background(
        self,
        request: Request,
        output: Literal["rgba", "mask"] = "rgba",
        timeout_ms: Timeout = None,
    ) -> Response:
        """RGBA cutout (``output=rgba``) or grayscale alpha matte (``output=mask``) as PNG."""
        frame = await self._decode(await read_image(request, self.args.max_body_bytes))
        png = await self._cutout(frame, output, deadline_of(timeout_ms))
        return Response(png, media_type="image/png")

    @app.post("/v1/segment", dependencies=[Auth, AdmitOne])
    async def segment(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        timeout_ms: Timeout = None,
    ) -> dict[str, Any]:
        """Instances with boxes, scores, classes and COCO RLE masks."""
        frame = await self._decode_for_yolo(await read_image(request, self.args.max_body_bytes))
        result: dict[str, Any] = await self._call(
            self.yolo.segment, frame, options, deadline_of(timeout_ms)
        )
        return result

    @app.post("/v1/products", dependencies=[Auth, AdmitOne])
    async def products(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        margin: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
        timeout_ms: Timeout = None,
    ) -> dict[str, Any]:
        """YOLO finds the objects; RMBG-2.0 cuts each one out (crop plus margin) as RGBA PNG."""
        frame = await self._decode(await read_image(request, self.args.max_body_bytes))
        deadline = deadline_of(timeout_ms)
        found = await self._call(self.yolo.segment, frame, options, deadline)
        margin = self.args.product_margin if margin is None else margin
        crops = [crop_with_margin(frame, inst["box"], margin) for inst in found["instances"]]
        mattes = await asyncio.gather(
            *(self._call(self.rmbg.remove_background, crop, deadline) for crop, _ in crops)
        )
        cutouts = await asyncio.gather(
            *(
                self._run_codec(rgba_png, crop, alpha)
                for (crop, _), alpha in zip(crops, mattes, strict=True)
            )
        )
        products = [
            {
                **{k: inst[k] for k in ("box", "score", "class_id", "class_name")},
                "crop_box": crop_box,
                "cutout": b64(png),
            }
            for inst, (_, crop_box), png in zip(found["instances"], crops, cutouts, strict=True)
        ]
        return {"width": found["width"], "height": found["height"], "products": products}

    @app.post("/v1/frames", dependencies=[Auth])
    async def frames(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        task: Literal["remove-background", "segment"] = "remove-background",
        output: Literal["rgba", "mask"] = "rgba",
        timeout_ms: Timeout = None,
    ) -> JSONResponse:
        """Many frames (repeated multipart field ``frames``), results in order; a bad frame
        gets an error entry of its own."""
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise InvalidRequestError("send frames as multipart/form-data, repeated field 'frames'")
        files = await read_form_files(
            request, "frames", self.args.max_body_bytes, self.args.max_frames_per_request
        )
        deadline = deadline_of(timeout_ms)
        with self.budget.admit(len(files)):
            if task == "segment":
                results = await self._segment_each(files, options, deadline)
            else:
                results = await self._cutout_each(files, output, deadline)
        entries: list[dict[str, Any]] = []
        for index, result in enumerate(results):
            if isinstance(result, SegmentationError):
                entries.append({"index": index, **error_body(result.code, result.message)})
            elif isinstance(result, BaseException):
                raise result
            elif task == "segment":
                entries.append({"index": index, **result})
            else:
                entries.append({"index": index, "content_type": "image/png", "image": b64(result)})
        failed = sum("error" in e for e in entries)
        return JSONResponse(
            {"task": task, "count": len(entries), "failed": failed, "frames": entries}
        )

    async def _in_calls(self, method: Any, frames: list[Any], *args: Any) -> list[Any]:
        """``method`` on ``frames`` in calls of ``frames_per_call``; frames that failed before
        (an exception in their place) are not sent and keep their error."""
        good = [i for i, frame in enumerate(frames) if not isinstance(frame, BaseException)]
        size = self.args.frames_per_call
        chunks = [good[start : start + size] for start in range(0, len(good), size)]
        answers = await asyncio.gather(
            *(self._call(method, [frames[i] for i in chunk], *args) for chunk in chunks),
            return_exceptions=True,
        )
        results = list(frames)
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, SegmentationError):  # e.g. the replica's queue was full
                answer = [answer] * len(chunk)
            elif isinstance(answer, BaseException):
                raise answer
            for index, result in zip(chunk, answer, strict=True):
                results[index] = result
        return results

    async def _segment_each(
        self, files: list[bytes], options: DetectOptions, deadline: float | None
    ) -> list[Any]:
        frames = await asyncio.gather(
            *(self._decode_for_yolo(f) for f in files), return_exceptions=True
        )
        return await self._in_calls(self.yolo.segment_each, frames, options, deadline)

    async def _cutout_each(
        self, files: list[bytes], output: str, deadline: float | None
    ) -> list[Any]:
        frames = await asyncio.gather(*(self._decode(f) for f in files), return_exceptions=True)
        mattes = await self._in_calls(self.rmbg.remove_background_each, frames, deadline)

        async def encode(frame: Any, alpha: Any) -> Any:
            if isinstance(alpha, BaseException):
                return alpha
            return await self._encode_matte(frame, alpha, output)

        return await asyncio.gather(
            *(encode(f, a) for f, a in zip(frames, mattes, strict=True)), return_exceptions=True
        )

    async def _decode(self, data: bytes) -> np.ndarray:
        """Decode and validate one image in the codec pool (413/415/400 on bad input)."""
        return await self._run_codec(decode_image, data, max_pixels=self.args.max_pixels)

    async def _decode_for_yolo(self, data: bytes) -> np.ndarray | EncodedJPEG:
        """Plain JPEGs go to the YOLO replica undecoded (nvJPEG there, when enabled);
        anything else is decoded here."""
        if self.args.device_jpeg_decode:
            jpeg = await self._run_codec(probe_jpeg, data, max_pixels=self.args.max_pixels)
            if jpeg is not None:
                return jpeg
        return await self._decode(data)

    async def _cutout(self, frame: np.ndarray, output: str, deadline: float | None) -> bytes:
        """RMBG-2.0 matte of ``frame``, encoded as an RGBA cutout or a grayscale mask PNG."""
        alpha = await self._call(self.rmbg.remove_background, frame, deadline)
        return await self._encode_matte(frame, alpha, output)

    async def _encode_matte(self, frame: np.ndarray, alpha: np.ndarray, output: str) -> bytes:
        """An RGBA cutout PNG (``output="rgba"``) or a grayscale matte PNG (``"mask"``)."""
        if output == "mask":
            return await self._run_codec(mask_png, alpha)
        return await self._run_codec(rgba_png, frame, alpha)

    async def _run_codec(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a codec off the event loop; its time is reported per function."""
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._codec, lambda: fn(*args, **kwargs)
            )
        finally:
            self.stages.add(f"codec:{fn.__name__}", time.perf_counter() - started)

    async def _call(self, method: Any, *args: Any) -> Any:
        """Call a deployment method, re-raising the replica's own error type."""
        try:
            return await method.remote(*args)
        except Exception as exc:
            raise unwrap(exc) from None
