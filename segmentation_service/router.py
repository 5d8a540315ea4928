"""The HTTP ingress: one FastAPI app that composes the two segmentor deployments.

``/openapi.json`` (and ``/docs``, which can upload an image) describes every request body,
parameter, answer and error status; ``tests/integration/test_contract.py`` checks the running
service against it.
"""

import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from segmentation.encoders import b64
from segmentation.errors import (
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    SegmentationError,
)
from segmentation.imaging import SUPPORTED_FORMATS, EncodedImage, EncodedOutput, probe_image
from segmentation.options import (
    NO_MARGIN,
    CutoutOptions,
    DetectOptions,
    ImageFormat,
    margin_region,
    output_pixels_bound,
    parse_color,
    parse_margin,
)
from segmentation_service import compat
from segmentation_service.admission import ByteBudget, FrameBudget
from segmentation_service.auth import key_matches, load_api_key
from segmentation_service.config import RouterArgs
from segmentation_service.crops import crop_box
from segmentation_service.deadlines import MAX_TIMEOUT_MS, Deadline
from segmentation_service.docs_assets import serve_docs_offline
from segmentation_service.errors import (
    RequestTimeoutError,
    UnauthorizedError,
    error_response,
    install_handlers,
    unwrap,
)
from segmentation_service.inputs import Charge, read_form_files, read_image
from segmentation_service.metrics import StageTotals
from segmentation_service.resources import codec_threads
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
from segmentation_service.status import ReplicaCounts

app = FastAPI(
    title="product-segmentor",
    version="0.1.0",
    description="Background removal (RMBG-2.0) and instance segmentation (YOLO11-seg) for "
    'product video frames. Errors are `{"error": {"code", "message"}}`.',
    docs_url=None,  # FastAPI's pages load from CDNs: served offline below instead
    redoc_url=None,
)
serve_docs_offline(app)
install_handlers(app)

#: Route templates have a bounded count; every path no route matches shares one entry.
UNMATCHED = "unmatched"
#: What FastAPI serves about the API itself: behind the key too when authentication is on.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@app.middleware("http")
async def _time_requests(request: Request, call_next: Any) -> Any:
    """Stamp the arrival time (the request deadline counts from it) and time each request
    under its route template, so per-route totals stay as many as the routes: keyed by the
    raw path, 3,000 random unknown paths made 3,000 entries. With authentication on, the
    API's description (``/docs``, ``/openapi.json``) needs the key as well, unless
    ``router.public_docs``."""
    started = time.perf_counter()
    request.state.arrived = time.time()
    router = getattr(request.app.state, "router", None)
    if _app_path(request) in DOCS_PATHS and router is not None and not router.args.public_docs:
        try:
            router.authorize(request.headers.get("authorization", ""))
        except UnauthorizedError as exc:
            return error_response(exc)
    response = await call_next(request)
    if router is not None:
        route = request.scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED
        router.stages.add(template, time.perf_counter() - started)
    return response


def _app_path(request: Request) -> str:
    """The request's path inside this application (without its ``route_prefix``)."""
    path: str = request.scope.get("path", "")
    root: str = request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


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
        le=MAX_TIMEOUT_MS,
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
CUTOUT_MEDIA_TYPES = ("image/png", "image/webp", "image/jpeg")
PNG_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The cutout (output=rgba: RGBA, or RGB on an opaque background) or "
        "grayscale matte (output=mask), at the input's size unless cropped; PNG unless "
        "`format` says otherwise.",
        "content": {media: {"schema": _BINARY} for media in CUTOUT_MEDIA_TYPES},
        "headers": {
            "X-Cutout-Box": {
                "description": "With crop=true: the frame pixels the image covers, "
                "left,top,right,bottom (the subject plus crop_margin; may reach past the "
                "frame's edge).",
                "schema": {"type": "string", "pattern": r"^-?\d+,-?\d+,-?\d+,-?\d+$"},
            }
        },
    }
}
_ERRORS: dict[int, str] = {
    400: "The image could not be decoded (corrupt, truncated, empty).",
    401: "Missing or wrong API key (only when the deployment sets router.api_key_env).",
    408: "The body did not arrive within router.body_timeout_s.",
    413: "Body, image or request over a configured limit (max_body_bytes, max_pixels, "
    "max_frames_per_request, max_request_pixels, max_inflight_frames, max_products).",
    415: "Content-Type or image format not accepted.",
    422: "A parameter has a value that is not accepted.",
    503: "Overloaded (admission budget, queue, GPU memory, or a model deployment that is "
    "unavailable now): retry after Retry-After seconds.",
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


IMAGE_ERRORS = errors(400, 401, 408, 413, 415, 422, 503, 504)


def probe_images(files: Sequence[bytes], max_pixels: int) -> list[EncodedImage | SegmentationError]:
    """Each file's checked header (:func:`probe_image`), or the error that file alone gets
    (400/413/415); any other failure is raised."""
    probed: list[EncodedImage | SegmentationError] = []
    for data in files:
        try:
            probed.append(probe_image(data, max_pixels=max_pixels))
        except SegmentationError as exc:
            probed.append(exc)
    return probed


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
    return checked_options(conf, iou, max_det, parsed)


#: Class ids a request may name; the YOLO replica checks them against its model's classes.
MAX_CLASS_ID = 1_000_000


def checked_options(
    conf: float, iou: float, max_det: int, classes: Sequence[int] | None
) -> DetectOptions:
    """``DetectOptions`` from a request's values (HTTP query or gRPC message), 422 when one is
    out of range; the max_det a deployment allows is checked where its limit is known."""
    problems = [
        f"{name}={value}: must be between {low} and {high}"
        for name, value, low, high in (
            ("conf", conf, 0.0, 1.0),
            ("iou", iou, 0.0, 1.0),
            ("max_det", max_det, 1, 1000),
        )
        if not low <= value <= high
    ]
    if classes and any(not 0 <= c <= MAX_CLASS_ID for c in classes):
        problems.append(f"classes must be class ids between 0 and {MAX_CLASS_ID}")
    if problems:
        raise InvalidRequestError("; ".join(problems))
    return DetectOptions(
        conf=conf, iou=iou, classes=tuple(classes) if classes else None, max_det=max_det
    )


def product_cutout_options(
    refine: Annotated[
        bool,
        Query(
            description="Estimate the foreground's own colour at soft edges (hair, blur) "
            "instead of keeping the original pixels, which carry the old background's colour."
        ),
    ] = False,
    background: Annotated[
        str | None,
        Query(
            description="Compose onto this colour: hex (ffffff, fff, 81d4fa77 with alpha), a "
            "colour name (white) or r,g,b[,a]. Opaque: an RGB image. Omitted: keep alpha."
        ),
    ] = None,
    crop: Annotated[
        bool,
        Query(description="Cut to the subject (the matte's non-zero pixels) plus crop_margin."),
    ] = False,
    crop_margin: Annotated[
        str,
        Query(
            description="Margin around the subject with crop: pixels (30, 30px) or a share of "
            "its size (10%); 1, 2 or 4 values (top, right, bottom, left). Past the frame's "
            "edge it is transparent (or the background)."
        ),
    ] = "0",
    format: Annotated[
        ImageFormat,
        Query(
            description="png, webp (alpha kept; lossy unless lossless) or jpeg (needs an "
            "opaque background)."
        ),
    ] = "png",
    quality: Annotated[
        int, Query(ge=1, le=100, description="Quality of jpeg and lossy webp, 1-100.")
    ] = 90,
    lossless: Annotated[bool, Query(description="webp only: lossless WebP.")] = False,
) -> CutoutOptions:
    """The cutout options of a request (422 naming each bad value)."""
    return CutoutOptions(
        refine=refine,
        background=parse_color(background) if background else None,
        crop=crop,
        crop_margin=parse_margin(crop_margin),
        format=format,
        quality=quality,
        lossless=lossless,
    )


def covered(
    crop: list[int], subject: tuple[int, int, int, int] | None, options: CutoutOptions
) -> list[int]:
    """Frame pixels a product's cutout image covers: its crop, or with ``crop`` the subject
    found in the crop (crop coordinates) grown by the margin (the whole crop when the matte
    is empty: nothing was cut)."""
    if not options.crop or subject is None:
        return list(crop)
    left, top, right, bottom = margin_region(subject, options.crop_margin)
    return [crop[0] + left, crop[1] + top, crop[0] + right, crop[1] + bottom]


def frame_cutout_box(out: EncodedOutput, options: CutoutOptions) -> list[int] | None:
    """With ``crop``: the frame pixels a whole frame's cutout covers (:func:`covered`);
    None without ``crop``."""
    return covered([0, 0, out.width, out.height], out.subject, options) if options.crop else None


def admitted_pixels(width: int, height: int, cutout: CutoutOptions | None) -> int:
    """Pixels admission holds for an image (or a product's crop) of ``width`` x ``height``:
    what it decodes to, or more when the cutout options can make its output larger (a crop
    whose margin reaches past it)."""
    if cutout is None or cutout.output == "raw":
        return width * height
    return max(width * height, output_pixels_bound(width, height, cutout))


def crop_hint(cutout: CutoutOptions | None) -> str:
    """What a request that can never fit can change, when its crop margin grows it."""
    if cutout is None or not cutout.crop or cutout.crop_margin == NO_MARGIN:
        return ""
    return (
        "with crop, a margin grows the output past the image (up to half the subject or "
        "500 px a side): ask for a smaller crop_margin"
    )


def check_no_cutout_options(options: CutoutOptions, task: str) -> None:
    """422 when a request that makes no cutout sets cutout options (they would be ignored)."""
    if dataclasses.replace(options, output="rgba") != CutoutOptions():
        raise InvalidRequestError(
            f"cutout options (refine, background, crop, crop_margin, format, quality, "
            f"lossless) apply to task=remove-background, not task={task}"
        )


def cutout_query_options(
    options: Annotated[CutoutOptions, Depends(product_cutout_options)],
    output: Annotated[
        Literal["rgba", "mask"],
        Query(description="rgba: the cutout; mask: the grayscale alpha matte."),
    ] = "rgba",
) -> CutoutOptions:
    """``output`` beside the cutout options; a mask takes no refine or background (422)."""
    return dataclasses.replace(options, output=output)


def request_deadline(request: Request, timeout_ms: Timeout = None) -> Deadline:
    """The request's deadline, counted from its arrival (504 at once if it already passed)."""
    return Deadline.of_request(getattr(request.state, "arrived", None), timeout_ms)


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
    router.authorize(request.headers.get("authorization", ""))


Auth = Depends(require_api_key)
RequestDeadline = Annotated[Deadline, Depends(request_deadline)]
# remove.bg's and rembg's drop-in routes: the same path as /v1/remove-background (Router.cutout)
compat.install(app, bearer_scheme="APIKey")


_generate_openapi = app.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's schema; with no API key configured, each operation also accepts no
    credentials (``{}`` in its security list), as this deployment does."""
    if app.openapi_schema is None:
        schema = _generate_openapi()
        compat.document(schema)
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
    """The ingress: reads each request, checks its images' headers, admits it by frames and
    pixels, and hands the encoded images to the RMBG-2.0 and YOLO11-seg deployments, which
    decode them next to the model and answer what the client gets (PNG bytes, instances).
    It holds no pixels and never imports torch."""

    def __init__(
        self, rmbg: DeploymentHandle, yolo: DeploymentHandle, args: dict[str, Any] | None = None
    ) -> None:
        self.rmbg = rmbg
        self.yolo = yolo
        self.args = RouterArgs.model_validate(args or {})
        self.api_key = load_api_key(self.args.api_key_env)  # fails closed: see auth.py
        self.stages = StageTotals()
        self.budget = FrameBudget(
            self.args.max_inflight_frames,
            self.args.max_inflight_pixels,
            self.args.max_request_pixels,
        )
        self.body_bytes = ByteBudget(self.args.max_inflight_body_bytes)
        # Header probes only (the replicas decode and encode): a few threads, sized from the
        # CPUs Ray gave this replica, keep a pathological header off the event loop.
        self._codec = ThreadPoolExecutor(codec_threads(), thread_name_prefix="probe")
        self._replicas = ReplicaCounts()
        app.state.router = self
        app.openapi_schema = None  # its security section depends on api_key

    def authorize(self, header: str) -> None:
        """Check an ``Authorization: Bearer <key>`` value (HTTP header or gRPC metadata)."""
        if self.api_key is None:
            return
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token or not key_matches(token, self.api_key):
            raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")

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
        rmbg, yolo, replicas = await asyncio.gather(
            self._call(self.rmbg.info, deadline=deadline),
            self._call(self.yolo.info, deadline=deadline),
            self._replicas.get(),
        )
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
                    in_flight_pixels=self.budget.in_flight_pixels,
                    max_inflight_pixels=self.args.max_inflight_pixels,
                    body_bytes_held=self.body_bytes.held,
                    rejected=self.budget.rejected + self.body_bytes.rejected,
                ),
            )
        )

    @app.post(
        "/v1/remove-background",
        dependencies=[Auth],
        response_class=Response,
        responses={**PNG_ANSWER, **IMAGE_ERRORS},
        openapi_extra=IMAGE_BODY,
    )
    async def remove_background(
        self,
        request: Request,
        deadline: RequestDeadline,
        options: Annotated[CutoutOptions, Depends(cutout_query_options)],
    ) -> Response:
        """RGBA cutout (``output=rgba``) or grayscale alpha matte (``output=mask``), as PNG
        unless ``format`` says otherwise; edge colours refined, on a background colour,
        cropped to the subject, as asked. Composed on the model's device, encoded there."""
        read = self._http_image(request)

        async def image_and_options(charge: Charge) -> tuple[bytes, CutoutOptions]:
            return await read(charge), options

        out = await self.cutout(image_and_options, deadline)
        box = frame_cutout_box(out, options)
        headers = {"X-Cutout-Box": ",".join(map(str, box))} if box else None
        return Response(out.data, media_type=out.media_type, headers=headers)

    @app.post(
        "/v1/segment",
        dependencies=[Auth],
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
        self._check_max_det(options)
        async with self._one_image(self._http_image(request), deadline) as image:
            result = await self._call(
                self.yolo.segment, image, options, deadline.at, deadline=deadline
            )
        return json_answer(SegmentationResult.model_validate(result))

    @app.post(
        "/v1/products",
        dependencies=[Auth],
        response_model=ProductsResult,
        responses=IMAGE_ERRORS,
        openapi_extra=IMAGE_BODY,
    )
    async def products(
        self,
        request: Request,
        options: Annotated[DetectOptions, Depends(detect_options)],
        cutout: Annotated[CutoutOptions, Depends(product_cutout_options)],
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
        """YOLO finds the objects; RMBG-2.0 cuts each one out (crop plus margin) as RGBA PNG,
        or as the cutout options ask (refined edges, a background, cropped to the subject,
        WebP or JPEG: ``media_type`` says which).

        Holds 1 frame of the admission budget for the detection, then 1 more per object
        found (and its crop's pixels) while their cutouts run: 503 if the budget cannot
        take them now; 413 if it never could, or if more than ``router.max_products`` objects
        were found (lower ``max_det`` or raise ``conf``)."""
        self._check_max_det(options)
        margin = self.args.product_margin if margin is None else margin
        async with self._one_image(self._http_image(request), deadline) as image:
            found, boxes, cutouts = await self._products(image, options, margin, deadline, cutout)
        products = [
            Product(
                **{k: inst[k] for k in ("box", "score", "class_id", "class_name")},
                crop_box=box,
                cutout=b64(out.data),
                media_type=out.media_type,
                cutout_box=covered(box, out.subject, cutout),
            )
            for inst, box, out in zip(found["instances"], boxes, cutouts, strict=True)
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
        cutout: Annotated[CutoutOptions, Depends(cutout_query_options)],
        task: Annotated[
            Literal["remove-background", "segment"],
            Query(description="What to do with each frame."),
        ] = "remove-background",
    ) -> Response:
        """Many frames (repeated multipart field ``frames``), results in order; a bad frame
        gets an error entry of its own. Holds one frame of the admission budget per frame,
        and the pixels each decodes to. With ``task=remove-background`` every frame takes the
        cutout options (``output``, ``refine``, ``background``, ``crop``, ``format``...) as
        ``/v1/remove-background`` does; ``task=segment`` takes the detection options."""
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise InvalidRequestError("send frames as multipart/form-data, repeated field 'frames'")
        if task == "segment":
            self._check_max_det(options)
            check_no_cutout_options(cutout, task)
        with self.body_bytes.account() as charge:
            files = await self._read_body(
                read_form_files(
                    request,
                    "frames",
                    self.args.max_body_bytes,
                    self.args.max_frames_per_request,
                    max_files_setting="max_frames_per_request",
                    charge=charge,
                ),
                deadline,
            )
            results = await self._each(files, task, cutout, options, deadline)
        entries: list[FrameCutout | FrameSegmentation | FrameError] = []
        for index, result in enumerate(results):
            if isinstance(result, SegmentationError):
                entries.append(
                    FrameError(index=index, error=Error(code=result.code, message=result.message))
                )
            elif task == "segment":
                entries.append(FrameSegmentation.model_validate({"index": index, **result}))
            else:
                entries.append(
                    FrameCutout(
                        index=index,
                        content_type=result.media_type,
                        image=b64(result.data),
                        width=result.width,
                        height=result.height,
                        cutout_box=frame_cutout_box(result, cutout),
                    )
                )
        failed = sum(isinstance(e, FrameError) for e in entries)
        return json_answer(
            FramesResult(task=task, count=len(entries), failed=failed, frames=entries)
        )

    # -- the work both transports share ----------------------------------------------------
    @property
    def max_body_bytes(self) -> int:
        return self.args.max_body_bytes

    async def cutout(self, read: compat.Read, deadline: Deadline) -> EncodedOutput:
        """One image's background removed as its request asks: ``read`` reads the body
        (within ``body_timeout_s``, its bytes counted) and gives the image and the options
        it asks for; the image's header is checked, it is admitted, and the RMBG-2.0 replica
        answers the encoded output. ``/v1/remove-background`` and the drop-in routes
        (``compat``) all come here."""
        chosen: list[CutoutOptions] = []

        async def image_only(charge: Charge) -> bytes:
            data, options = await read(charge)
            chosen.append(options)
            return data

        async with self._one_image(image_only, deadline, lambda: chosen[0]) as image:
            out: EncodedOutput = await self._call(
                self.rmbg.remove_background, image, chosen[0], deadline.at, deadline=deadline
            )
        return out

    def _http_image(self, request: Request) -> Callable[[Charge], Awaitable[bytes]]:
        """How to read the one image of an HTTP request (raw body or multipart ``image``)."""
        return lambda charge: read_image(request, self.args.max_body_bytes, charge)

    @asynccontextmanager
    async def _one_image(
        self,
        read: Callable[[Charge], Awaitable[bytes]] | bytes,
        deadline: Deadline,
        cutout: Callable[[], CutoutOptions | None] = lambda: None,
    ) -> AsyncIterator[EncodedImage]:
        """A request's one image, read (within ``body_timeout_s``), its header checked, and
        admitted: one frame and the pixels it decodes to, or the most its output can have
        under the ``cutout`` options (known once the body is read), held for the block."""
        with self.body_bytes.account() as charge:
            if isinstance(read, bytes):
                charge(len(read))
                data = read
            else:
                data = await self._read_body(read(charge), deadline)
            image = await self._probe(data)
            options = cutout()
            with self.budget.admit(
                1, admitted_pixels(image.width, image.height, options), too_large=crop_hint(options)
            ):
                yield image

    async def _read_body(self, reading: Awaitable[T], deadline: Deadline) -> T:
        """``reading`` within ``body_timeout_s`` (408) and the request's deadline (504)."""
        limit = self.args.body_timeout_s
        return await deadline.bound(
            reading,
            cap_s=limit,
            capped=lambda: RequestTimeoutError(
                f"the request body did not arrive within {limit:g} s (router.body_timeout_s)"
            ),
        )

    async def _probe(self, data: bytes) -> EncodedImage:
        """The image's header, checked (400/413/415), off the event loop."""
        return await self._run_codec(probe_image, data, max_pixels=self.args.max_pixels)

    async def _products(
        self,
        image: EncodedImage,
        options: DetectOptions,
        margin: float,
        deadline: Deadline,
        cutout: CutoutOptions | None = None,
    ) -> tuple[dict[str, Any], list[list[int]], list[EncodedOutput]]:
        """Detections, crop boxes and cutout PNGs of one admitted image. The count is checked
        before any crop exists; the crops are made by the RMBG-2.0 replica, out of the image
        it decodes once."""
        found = await self._call(self.yolo.segment, image, options, deadline.at, deadline=deadline)
        instances = found["instances"]
        if len(instances) > self.args.max_products:
            raise PayloadTooLargeError(
                f"{len(instances)} objects were found; /v1/products cuts out at most "
                f"router.max_products={self.args.max_products}: lower max_det (asked "
                f"{options.max_det}) or raise conf"
            )
        width, height = found["width"], found["height"]
        boxes = [crop_box(inst["box"], margin, width, height) for inst in instances]
        hint = crop_hint(cutout)
        with self.budget.admit(
            len(boxes),
            sum(
                admitted_pixels(right - left, bottom - top, cutout)
                for left, top, right, bottom in boxes
            ),
            held=1,
            held_pixels=image.pixels,
            too_large=f"{len(boxes)} objects were found; lower max_det (asked "
            f"{options.max_det}){'; ' + hint if hint else ''}",
        ):
            cutouts = (
                await self._call(
                    self.rmbg.cutouts, image, boxes, deadline.at, cutout, deadline=deadline
                )
                if boxes
                else []
            )
        return found, boxes, cutouts

    async def _each(
        self,
        files: Sequence[bytes],
        task: str,
        cutout: CutoutOptions,
        options: DetectOptions,
        deadline: Deadline,
    ) -> list[Any]:
        """One result per file, in order: bytes (``task="remove-background"``) or a
        segmentation dict, or the frame's own :class:`SegmentationError`. The frames whose
        header is fine are admitted together (frames and pixels) for the whole call."""
        probed = await self._probe_all(files)
        with self._admit_all(probed, None if task == "segment" else cutout):
            return await self._run_each(probed, task, cutout, options, deadline)

    async def _probe_all(self, files: Sequence[bytes]) -> list[Any]:
        """Each file's checked header, or its own error in its place: all of them in one
        call off the event loop, a thread hop a request instead of one a frame (docs/
        benchmarks.md, "The Router's header probes in one call")."""
        return await self._run_codec(probe_images, files, self.args.max_pixels)

    def _admit_all(
        self, probed: Sequence[Any], cutout: CutoutOptions | None = None
    ) -> AbstractContextManager[None]:
        """Admission of a many-frame request: its frames, and their pixels (or the most
        their outputs can have under ``cutout``)."""
        hint = crop_hint(cutout)
        return self.budget.admit(
            len(probed),
            sum(
                admitted_pixels(i.width, i.height, cutout)
                for i in probed
                if isinstance(i, EncodedImage)
            ),
            too_large=f"send at most max_frames_per_request={self.args.max_frames_per_request} "
            f"frames, and fewer or smaller images{'; ' + hint if hint else ''}",
        )

    async def _run_each(
        self,
        probed: list[Any],
        task: str,
        cutout: CutoutOptions,
        options: DetectOptions,
        deadline: Deadline,
    ) -> list[Any]:
        if task == "segment":
            return await self._in_calls(
                self.yolo.segment_each, probed, options, deadline.at, deadline=deadline
            )
        return await self._in_calls(
            self.rmbg.remove_background_each, probed, cutout, deadline.at, deadline=deadline
        )

    async def _in_calls(
        self, method: Any, frames: list[Any], *args: Any, deadline: Deadline
    ) -> list[Any]:
        """``method`` on ``frames`` in calls of ``frames_per_call``; frames that failed before
        (an exception in their place) are not sent and keep their error. A call refused as a
        whole for the request's options (422) fails the request, and so does a call that
        could not run now (503 with Retry-After: the replica holding it stopped, e.g. in a
        rollout or with its node, or its queue was full), so that a client's retry sends
        every frame again: a frame error inside a 200 answer is never retried. Any other
        error of a call is each of its frames' own."""
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
            if isinstance(answer, (InvalidRequestError, OverloadedError)):
                raise answer
            if isinstance(answer, SegmentationError):
                answer = [answer] * len(chunk)
            elif isinstance(answer, BaseException):
                raise answer
            for index, result in zip(chunk, answer, strict=True):
                results[index] = unwrap(result) if isinstance(result, BaseException) else result
        return results

    def _check_max_det(self, options: DetectOptions) -> None:
        if options.max_det > self.args.max_det:
            raise InvalidRequestError(
                f"max_det={options.max_det} is over this deployment's limit of "
                f"{self.args.max_det} (router.max_det)"
            )

    async def _run_codec(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` off the event loop; its time is reported per function."""
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
        the replica call is cancelled), so a stuck replica cannot hold a request forever;
        a request that ends for any other reason (its client went away, a sibling call
        failed) cancels the call too, and the replica drops its queued frames. Replica
        methods take the deadline too (``deadline.at`` among ``args``) and drop a frame
        whose deadline passed while it was queued."""
        deadline = deadline or Deadline(None)
        deadline.remaining()
        response = method.remote(*args)
        try:
            return await deadline.bound(
                response, self.args.model_call_timeout_s, on_timeout=response.cancel
            )
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise unwrap(exc) from None
