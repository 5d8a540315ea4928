"""The HTTP ingress: one FastAPI app that composes the two segmentor deployments.

``/openapi.json`` (and ``/docs``, which can upload an image) describes every request body,
parameter, answer and error status; ``tests/integration/test_contract.py`` checks the running
service against it.
"""

import asyncio
import hmac
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from segmentation.encoders import b64, mask_png, rgba_png
from segmentation.errors import InvalidRequestError, SegmentationError
from segmentation.imaging import SUPPORTED_FORMATS, EncodedJPEG, decode_image, probe_jpeg
from segmentation.options import DetectOptions
from segmentation_service.admission import FrameBudget
from segmentation_service.config import RouterArgs
from segmentation_service.crops import crop_with_margin
from segmentation_service.deadlines import Deadline, as_deadline
from segmentation_service.errors import UnauthorizedError, install_handlers, unwrap
from segmentation_service.inputs import read_form_files, read_image
from segmentation_service.metrics import StageTotals
from segmentation_service.schemas import (
    Error,
    ErrorBody,
    FrameCutout,
    FrameError,
    FrameSegmentation,
    FramesResult,
    Health,
    ModelsInfo,
    ModelStatus,
    Product,
    ProductsResult,
    RouterStatus,
    SegmentationResult,
)
from segmentation_service.status import replica_counts

app = FastAPI(
    title="product-segmentor",
    version="0.1.0",
    description="Background removal (RMBG-2.0) and instance segmentation (YOLO11-seg) for "
    'product video frames. Errors are `{"error": {"code", "message"}}`.',
)
install_handlers(app)

#: Route templates have a bounded count; every path no route matches shares one entry.
UNMATCHED = "unmatched"


@app.middleware("http")
async def _time_requests(request: Request, call_next: Any) -> Any:
    """Stamp the arrival time (the request deadline counts from it) and time each request
    under its route template, so per-route totals stay as many as the routes: keyed by the
    raw path, 3,000 random unknown paths made 3,000 entries."""
    started = time.perf_counter()
    request.state.arrived = time.time()
    response = await call_next(request)
    router = getattr(request.app.state, "router", None)
    if router is not None:
        route = request.scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED
        router.stages.add(template, time.perf_counter() - started)
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
    Header(
        alias="X-Request-Timeout-Ms",
        ge=1,
        description="Answer 504 when the request is not answered within this many "
        "milliseconds of its arrival at the router.",
    ),
]

# -- what /openapi.json says about bodies and errors ------------------------------------------
_BINARY = {"type": "string", "format": "binary"}
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
_FORMATS = ", ".join(SUPPORTED_FORMATS)


def _raw_and_multipart(field: str, multipart_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": f"One image ({_FORMATS}): the raw body with its image Content-Type, "
            f"or multipart/form-data field `{field}`.",
            "content": {
                **{media: {"schema": _BINARY} for media in IMAGE_MEDIA_TYPES},
                "application/octet-stream": {"schema": _BINARY},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {field: multipart_schema},
                        "required": [field],
                    }
                },
            },
        }
    }


IMAGE_BODY = _raw_and_multipart("image", _BINARY)
FRAMES_BODY = {
    "requestBody": {
        "required": True,
        "description": f"Many frames ({_FORMATS}) as multipart/form-data, the field `frames` "
        "repeated once per frame, answered in this order.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"frames": {"type": "array", "items": _BINARY}},
                    "required": ["frames"],
                }
            }
        },
    }
}
PNG_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "PNG at the input's size: RGBA cutout (output=rgba) or grayscale matte "
        "(output=mask).",
        "content": {"image/png": {"schema": _BINARY}},
    }
}
_ERRORS: dict[int, str] = {
    400: "The image could not be decoded (corrupt, truncated, empty).",
    401: "Missing or wrong API key (only when the deployment sets router.api_key_env).",
    413: "Body, image or request over a configured limit (max_body_bytes, max_pixels, "
    "max_frames_per_request, max_inflight_frames).",
    415: "Content-Type or image format not accepted.",
    422: "A parameter has a value that is not accepted.",
    503: "Overloaded (admission budget, queue or GPU memory): retry after Retry-After seconds.",
    504: "X-Request-Timeout-Ms expired, or no model answer within router.model_call_timeout_s.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries of the shared error schema for ``statuses``."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _ERRORS[status]}
        if status == 503:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        out[status] = entry
    return out


IMAGE_ERRORS = errors(400, 401, 413, 415, 422, 503, 504)


def json_answer(model: BaseModel) -> Response:
    """``model`` as JSON. Endpoints build their answer model (validated against the schema
    they publish) and serialize it once, not again through FastAPI."""
    return Response(model.model_dump_json(), media_type="application/json")


# -- dependencies -------------------------------------------------------------------------
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


def request_deadline(request: Request, timeout_ms: Timeout = None) -> Deadline:
    """The request's deadline, counted from its arrival (504 at once if it already passed)."""
    arrived = getattr(request.state, "arrived", None) or time.time()
    deadline = Deadline.after(arrived, timeout_ms)
    deadline.remaining()
    return deadline


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="`Authorization: Bearer <key>`, needed only when the deployment sets "
    "router.api_key_env.",
)


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    router: Router = request.app.state.router
    expected = router.api_key
    if expected is None:
        return
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token or not hmac.compare_digest(token, expected):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")


async def admit_one(request: Request) -> AsyncIterator[None]:
    """Hold one frame of the router's in-flight budget for the whole request (503 past it)."""
    router: Router = request.app.state.router
    with router.budget.admit(1):
        yield


Auth = Depends(require_api_key)
AdmitOne = Depends(admit_one)
RequestDeadline = Annotated[Deadline, Depends(request_deadline)]


_generate_openapi = app.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's schema; with no API key configured, each operation also accepts no
    credentials (``{}`` in its security list), as this deployment does."""
    if app.openapi_schema is None:
        schema = _generate_openapi()
        router = getattr(app.state, "router", None)
        if router is None or router.api_key is None:
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if operation.get("security"):
                        operation["security"].append({})
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


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
        app.openapi_schema = None  # its security section depends on api_key

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Response:
        return json_answer(Health(status="ok"))

    @app.get(
        "/v1/models",
        dependencies=[Auth],
        response_model=ModelsInfo,
        responses=errors(401, 503, 504),
    )
    async def models(self) -> Response:
        """Each model: source, revision, precision in use, batch settings, replicas, memory;
        and the router replica that answered (requests per route, admission budget)."""
        deadline = Deadline(None)
        rmbg, yolo = await asyncio.gather(
            self._call(self.rmbg.info, deadline=deadline),
            self._call(self.yolo.info, deadline=deadline),
        )
        replicas = replica_counts()
        for info, deployment in ((rmbg, "RMBGDeployment"), (yolo, "YoloDeployment")):
            info["replicas"] = replicas.get(deployment)
        return json_answer(
            ModelsInfo(
                models=[ModelStatus.model_validate(rmbg), ModelStatus.model_validate(yolo)],
                router=RouterStatus(
                    pid=os.getpid(),
                    torch_imported="torch" in sys.modules,
                    requests=self.stages.summary(),
                    in_flight_frames=self.budget.in_flight,
                    max_inflight_frames=self.budget.limit,
                    rejected=self.budget.rejected,
                ),
            )
        )

    @app.post(
        "/v1/remove-background",
        dependencies=[Auth, AdmitOne],
        response_class=Response,
        responses={**PNG_ANSWER, **IMAGE_ERRORS},
        openapi_extra=IMAGE_BODY,
    )
    async def remove_background(
        self,
        request: Request,
        deadline: RequestDeadline,
        output: Annotated[
            Literal["rgba", "mask"],
            Query(description="rgba: the cutout; mask: the grayscale alpha matte."),
        ] = "rgba",
    ) -> Response:
        """RGBA cutout (``output=rgba``) or grayscale alpha matte (``output=mask``) as PNG."""
        frame = await self._read_one(request, deadline, self._decode)
        png = await self._cutout(frame, output, deadline)
        return Response(png, media_type="image/png")

    @app.post(
        "/v1/segment",
        dependencies=[Auth, AdmitOne],
        response_model=SegmentationResult,
        responses=IMAGE_ERRORS,
        openapi_extra=IMAGE_BODY,
    )
    async def segment(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        deadline: RequestDeadline,
    ) -> Response:
        """Instances with boxes, scores, classes and COCO RLE masks."""
        frame = await self._read_one(request, deadline, self._decode_for_yolo)
        result = await self._call(self.yolo.segment, frame, options, deadline.at, deadline=deadline)
        return json_answer(SegmentationResult.model_validate(result))

    @app.post(
        "/v1/products",
        dependencies=[Auth, AdmitOne],
        response_model=ProductsResult,
        responses=IMAGE_ERRORS,
        openapi_extra=IMAGE_BODY,
    )
    async def products(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        deadline: RequestDeadline,
        margin: Annotated[
            float | None,
            Query(
                ge=0.0,
                le=1.0,
                description="Margin around each box, as a share of its size (default: the "
                "deployment's router.product_margin).",
            ),
        ] = None,
    ) -> Response:
        """YOLO finds the objects; RMBG-2.0 cuts each one out (crop plus margin) as RGBA PNG.

        Holds 1 frame of the admission budget for the detection, then 1 more per object
        found while their cutouts run (503 if the budget cannot take them now; 413 if it
        never could: lower ``max_det``)."""
        frame = await self._read_one(request, deadline, self._decode)
        found = await self._call(self.yolo.segment, frame, options, deadline.at, deadline=deadline)
        instances = found["instances"]
        margin = self.args.product_margin if margin is None else margin
        crops = [crop_with_margin(frame, inst["box"], margin) for inst in instances]
        with self.budget.admit(
            len(crops),
            held=1,
            too_large=f"{len(crops)} objects were found; lower max_det (asked {options.max_det})",
        ):
            mattes = await asyncio.gather(
                *(
                    self._call(self.rmbg.remove_background, crop, deadline.at, deadline=deadline)
                    for crop, _ in crops
                )
            )
            cutouts = await asyncio.gather(
                *(
                    deadline.bound(self._run_codec(rgba_png, crop, alpha))
                    for (crop, _), alpha in zip(crops, mattes, strict=True)
                )
            )
        products = [
            Product(
                **{k: inst[k] for k in ("box", "score", "class_id", "class_name")},
                crop_box=crop_box,
                cutout=b64(png),
            )
            for inst, (_, crop_box), png in zip(instances, crops, cutouts, strict=True)
        ]
        return json_answer(
            ProductsResult(width=found["width"], height=found["height"], products=products)
        )

    @app.post(
        "/v1/frames",
        dependencies=[Auth],
        response_model=FramesResult,
        responses=IMAGE_ERRORS,
        openapi_extra=FRAMES_BODY,
    )
    async def frames(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        deadline: RequestDeadline,
        task: Annotated[
            Literal["remove-background", "segment"],
            Query(description="What to do with each frame."),
        ] = "remove-background",
        output: Annotated[
            Literal["rgba", "mask"],
            Query(description="For task=remove-background: RGBA cutouts or grayscale mattes."),
        ] = "rgba",
    ) -> Response:
        """Many frames (repeated multipart field ``frames``), results in order; a bad frame
        gets an error entry of its own. Holds one frame of the admission budget per frame."""
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise InvalidRequestError("send frames as multipart/form-data, repeated field 'frames'")
        files = await deadline.bound(
            read_form_files(
                request,
                "frames",
                self.args.max_body_bytes,
                self.args.max_frames_per_request,
                max_files_setting="max_frames_per_request",
            )
        )
        with self.budget.admit(
            len(files),
            too_large=f"send at most max_frames_per_request={self.args.max_frames_per_request}",
        ):
            if task == "segment":
                results = await self._segment_each(files, options, deadline)
            else:
                results = await self._cutout_each(files, output, deadline)
        entries: list[FrameCutout | FrameSegmentation | FrameError] = []
        for index, result in enumerate(results):
            if isinstance(result, SegmentationError):
                entries.append(
                    FrameError(index=index, error=Error(code=result.code, message=result.message))
                )
            elif isinstance(result, BaseException):
                raise result
            elif task == "segment":
                entries.append(FrameSegmentation.model_validate({"index": index, **result}))
            else:
                entries.append(FrameCutout(index=index, image=b64(result)))
        failed = sum(isinstance(e, FrameError) for e in entries)
        return json_answer(
            FramesResult(task=task, count=len(entries), failed=failed, frames=entries)
        )

    async def _read_one(
        self, request: Request, deadline: Deadline, decode: Callable[[bytes], Any]
    ) -> Any:
        """The request's one image, read and decoded within its deadline."""
        data = await deadline.bound(read_image(request, self.args.max_body_bytes))
        return await deadline.bound(decode(data))

    async def _in_calls(
        self, method: Any, frames: list[Any], *args: Any, deadline: Deadline | None = None
    ) -> list[Any]:
        """``method`` on ``frames`` in calls of ``frames_per_call``; frames that failed before
        (an exception in their place) are not sent and keep their error."""
        good = [i for i, frame in enumerate(frames) if not isinstance(frame, BaseException)]
        size = self.args.frames_per_call
        chunks = [good[start : start + size] for start in range(0, len(good), size)]
        answers = await asyncio.gather(
            *(
                self._call(method, [frames[i] for i in chunk], *args, deadline=deadline)
                for chunk in chunks
            ),
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
        self, files: list[bytes], options: DetectOptions, deadline: Deadline | float | None
    ) -> list[Any]:
        deadline = as_deadline(deadline)
        frames = await asyncio.gather(
            *(deadline.bound(self._decode_for_yolo(f)) for f in files), return_exceptions=True
        )
        return await self._in_calls(
            self.yolo.segment_each, frames, options, deadline.at, deadline=deadline
        )

    async def _cutout_each(
        self, files: list[bytes], output: str, deadline: Deadline | float | None
    ) -> list[Any]:
        deadline = as_deadline(deadline)
        frames = await asyncio.gather(
            *(deadline.bound(self._decode(f)) for f in files), return_exceptions=True
        )
        mattes = await self._in_calls(
            self.rmbg.remove_background_each, frames, deadline.at, deadline=deadline
        )

        async def encode(frame: Any, alpha: Any) -> Any:
            if isinstance(alpha, BaseException):
                return alpha
            return await deadline.bound(self._encode_matte(frame, alpha, output))

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

    async def _cutout(self, frame: np.ndarray, output: str, deadline: Deadline) -> bytes:
        """RMBG-2.0 matte of ``frame``, encoded as an RGBA cutout or a grayscale mask PNG."""
        alpha = await self._call(self.rmbg.remove_background, frame, deadline.at, deadline=deadline)
        return await deadline.bound(self._encode_matte(frame, alpha, output))

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

    async def _call(self, method: Any, *args: Any, deadline: Deadline | None = None) -> Any:
        """Call a deployment method, re-raising the replica's own error type. The wait is
        bounded by the request's deadline and by ``model_call_timeout_s`` (504 past either;
        the replica call is cancelled), so a stuck replica cannot hold a request forever.
        Replica methods take the deadline too (``deadline.at`` among ``args``) and drop a
        frame whose deadline passed while it was queued."""
        deadline = deadline or Deadline(None)
        deadline.remaining()
        response = method.remote(*args)
        try:
            return await deadline.bound(
                response, self.args.model_call_timeout_s, on_timeout=response.cancel
            )
        except Exception as exc:
            raise unwrap(exc) from None
