"""Drop-in endpoints of two background-removal APIs, on the service's own request path.

- ``POST /v1.0/removebg``: remove.bg's API (its published OpenAPI document, v1.0): the image
  as multipart ``image_file`` or ``image_file_b64`` (multipart, url-encoded form or JSON);
  ``size``, ``type``, ``type_level``, ``format``, ``bg_color``, ``crop``, ``crop_margin``,
  ``channels``; the key in ``X-Api-Key``. Answers the image (``X-Width``, ``X-Height``,
  ``X-Type``, ``X-Credits-Charged``, and the foreground's box in it: ``X-Foreground-Top``,
  ``-Left``, ``-Width``, ``-Height``), or ``{"data": {"result_b64", "foreground_top",
  "foreground_left", "foreground_width", "foreground_height"}}`` to ``Accept:
  application/json``; errors ``{"errors": [{"title", "code", "detail"}]}`` (400 for bad
  input, 403 for the key, 429 with ``Retry-After`` when busy).
- ``POST /api/remove``: rembg's HTTP server (``rembg s``): multipart ``file`` and form
  fields ``model``, ``a`` (alpha matting), ``af``, ``ab``, ``ae``, ``om`` (only mask),
  ``ppm`` (post-process mask), query ``bgc`` (background ``r,g,b,a``) and ``extras``;
  answers a PNG; errors as FastAPI's ``{"detail": ...}``.

Both run exactly as ``/v1/remove-background`` does (``Router.cutout``): the same body limit
and timeout, header checks, admission budget, deadline (``X-Request-Timeout-Ms``), API key
(``Authorization: Bearer`` or ``X-Api-Key``) and per-route metrics. What a drop-in cannot
do here is refused with a clear error, never guessed: this service never fetches URLs
(remove.bg's ``image_url``, ``bg_image_url``), and the model is always RMBG-2.0 (rembg's
``model`` is accepted and ignored, as are remove.bg's car-only ``add_shadow`` and
``semitransparency``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from segmentation.errors import (
    DeadlineExceededError,
    InvalidImageError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    SegmentationError,
    UnsupportedMediaTypeError,
)
from segmentation.imaging import EncodedOutput
from segmentation.options import CutoutOptions, parse_bool, parse_color, parse_margin
from segmentation_service.compat_openapi import (
    REMBG_MODEL_PATTERN,
    REMBG_OPENAPI,
    REMOVEBG_FORMATS,
    REMOVEBG_OPENAPI,
    REMOVEBG_SIZES,
    REMOVEBG_TYPE_LEVELS,
    REMOVEBG_TYPES,
    X_API_KEY_SCHEME,
)
from segmentation_service.deadlines import Deadline, parse_timeout_ms
from segmentation_service.errors import (
    RequestTimeoutError,
    UnauthorizedError,
    http_status,
    unwrap,
)
from segmentation_service.inputs import Charge, parse_form, read_body

REMOVEBG_PATH = "/v1.0/removebg"
REMBG_PATH = "/api/remove"

#: A read of one request: its image bytes and the options it asks for.
Read = Callable[[Charge], Awaitable[tuple[bytes, CutoutOptions]]]


class CutoutService(Protocol):
    """What the drop-ins need of the router (``segmentation_service.router.Router``)."""

    @property
    def max_body_bytes(self) -> int: ...

    def authorize(self, header: str) -> None: ...

    async def cutout(self, read: Read, deadline: Deadline) -> EncodedOutput: ...


class CompatError(Exception):
    """A request a drop-in refuses, with the code and words of the API it imitates."""

    def __init__(self, status: int, code: str, title: str, detail: str | None = None) -> None:
        super().__init__(title)
        self.status, self.code, self.title, self.detail = status, code, title, detail


def _service(request: Request) -> CutoutService:
    service: CutoutService = request.app.state.router
    return service


def _authorize(request: Request) -> None:
    """``Authorization: Bearer <key>`` or ``X-Api-Key: <key>`` (remove.bg's clients send the
    latter); either opens the route when it holds the key."""
    service = _service(request)
    header = request.headers.get("authorization", "")
    api_key = request.headers.get("x-api-key", "")
    try:
        service.authorize(header)
    except UnauthorizedError:
        if not api_key:
            raise
        service.authorize(f"Bearer {api_key}")


def _deadline(request: Request) -> Deadline:
    """The request's deadline from ``X-Request-Timeout-Ms``, counted from its arrival."""
    timeout_ms = parse_timeout_ms(request.headers.get("x-request-timeout-ms"))
    return Deadline.of_request(getattr(request.state, "arrived", None), timeout_ms)


async def _fields(request: Request, body: bytes, charge: Charge) -> dict[str, Any]:
    """The fields of a multipart, url-encoded or JSON body (files as bytes)."""
    content_type = request.headers.get("content-type", "").lower()
    if not body:
        return {}  # nothing sent: the caller says which field is missing
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await parse_form(request, body, max_files=3, max_fields=64)
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                charge(len(data))
                fields[name] = data
            else:
                fields[name] = value
        return fields
    if content_type.startswith("application/json"):
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON body does not parse: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidRequestError("the JSON body must be an object of parameters")
        return parsed
    raise UnsupportedMediaTypeError(
        f"Content-Type {content_type or '(none)'!r} is not accepted: send multipart/form-data, "
        "application/x-www-form-urlencoded or application/json"
    )


def _b64_image(text: object, charge: Charge) -> bytes:
    value = str(text).strip()
    if value.startswith("data:") and "," in value:  # a data URI: its payload
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidImageError("image_file_b64 is not base64") from None
    charge(len(data))
    return data


# -- remove.bg ------------------------------------------------------------------------------
WHITE = (255, 255, 255, 255)


@dataclass
class RemoveBgRequest:
    """What a remove.bg request asked for, beside its image."""

    options: CutoutOptions = field(default_factory=CutoutOptions)
    foreground_type: str = "auto"
    type_level: str = "1"
    wants_json: bool = False


def _invalid(code: str, title: str, detail: str | None = None) -> CompatError:
    return CompatError(400, code, title, detail)


def removebg_options(fields: Mapping[str, Any]) -> RemoveBgRequest:
    """remove.bg's parameters as :class:`CutoutOptions` (400 with remove.bg's code for a
    value it would refuse, or one this service does not do)."""

    def text(name: str, default: str) -> str:
        value = fields.get(name)
        return default if value is None or value == "" else str(value)

    def flag(name: str) -> bool:
        try:
            return parse_bool(name, fields.get(name, False))
        except InvalidRequestError as exc:
            raise _invalid(
                f"invalid_{name}", f"Invalid value for parameter '{name}'", str(exc)
            ) from None

    def choice(name: str, default: str, allowed: Collection[str]) -> str:
        value = text(name, default)
        if value not in allowed:
            raise _invalid(
                f"invalid_{name}",
                f"Invalid value for parameter '{name}'",
                f"{name}={value!r}: expected one of {', '.join(allowed)}",
            )
        return value

    size = choice("size", "preview", REMOVEBG_SIZES)
    foreground_type = choice("type", "auto", REMOVEBG_TYPES)
    type_level = choice("type_level", "1", REMOVEBG_TYPE_LEVELS)
    channels = choice("channels", "rgba", ("rgba", "alpha"))
    fmt = text("format", "auto")
    if fmt not in REMOVEBG_FORMATS or fmt == "zip":
        raise _invalid(
            "invalid_format",
            "Invalid format parameter given",
            f"format={fmt!r}: this service answers png, jpg or webp (or auto); zip is not offered",
        )
    background = None
    if fields.get("bg_color"):
        try:
            background = parse_color(str(fields["bg_color"]))
        except InvalidRequestError as exc:
            raise _invalid(
                "invalid_bg_color", "Invalid bg_color parameter given", str(exc)
            ) from None
    for name in ("bg_image_url", "bg_image_file"):
        if fields.get(name):
            raise _invalid(
                "invalid_bg_image_url" if name == "bg_image_url" else "invalid_bg_image_file",
                f"{name} is not supported by this service",
                "backgrounds are colours only here: use bg_color",
            )
    crop = flag("crop")
    try:
        margin = parse_margin(text("crop_margin", "0"))
    except InvalidRequestError as exc:
        raise _invalid(
            "invalid_crop_margin", "Invalid crop_margin parameter given", str(exc)
        ) from None
    for name, default in (("roi", "0% 0% 100% 100%"), ("scale", "original")):
        value = text(name, default)
        if value.split() != default.split():
            raise _invalid(
                f"invalid_{name}",
                f"Invalid {name} parameter given",
                f"{name}={value!r}: this service supports only the default ({default})",
            )
    position = text("position", "original")
    if position != "original":
        raise _invalid(
            "invalid_position",
            "Invalid position parameter given",
            f"position={position!r}: this service supports only the default (original)",
        )
    for name in ("add_shadow", "semitransparency"):  # car-only at remove.bg too: no effect
        flag(name)

    alpha_only = channels == "alpha"
    if fmt == "auto":
        opaque = background is not None and background[3] == 255
        fmt = "jpg" if opaque and not alpha_only else "png"
    if fmt == "jpg" and not alpha_only and (background is None or background[3] != 255):
        background = WHITE if background is None else (*background[:3], 255)
    try:
        options = CutoutOptions(
            output="mask" if alpha_only else "rgba",
            refine=not alpha_only,  # remove.bg corrects the colours at edges too
            background=None if alpha_only else background,
            crop=crop,
            crop_margin=margin,
            max_pixels=REMOVEBG_SIZES[size],
            format="jpeg" if fmt == "jpg" else fmt,  # type: ignore[arg-type]
        )
    except InvalidRequestError as exc:
        raise _invalid("invalid_parameters", "Invalid parameters given", str(exc)) from None
    return RemoveBgRequest(options, foreground_type, type_level)


def _removebg_image(fields: Mapping[str, Any], charge: Charge) -> bytes:
    sources = [name for name in ("image_file", "image_file_b64", "image_url") if fields.get(name)]
    if not sources:
        raise _invalid(
            "missing_source",
            "No image given",
            "Please provide the source image in the image_file or image_file_b64 parameter.",
        )
    if len(sources) > 1:
        raise _invalid(
            "multiple_sources",
            "Multiple image sources given: Please provide either the image_url, image_file "
            "or image_file_b64 parameter.",
        )
    if sources[0] == "image_url":
        raise _invalid(
            "invalid_image_url",
            "image_url is not supported: this service never fetches URLs",
            "Send the image itself in image_file (multipart) or image_file_b64.",
        )
    if sources[0] == "image_file":
        data = fields["image_file"]
        if not isinstance(data, bytes):
            raise _invalid(
                "missing_source", "No image given", "image_file must be a file (multipart)"
            )
        return data
    return _b64_image(fields["image_file_b64"], charge)


#: The error code and title remove.bg gives each typed error of the service.
_REMOVEBG_ERRORS: tuple[tuple[type[SegmentationError], int, str, str], ...] = (
    (UnauthorizedError, 403, "auth_failed", "Missing or invalid API Key"),
    (InvalidImageError, 400, "failed_to_read_image", "There was an error reading the image."),
    (UnsupportedMediaTypeError, 400, "invalid_file_type", "Invalid file type"),
    (PayloadTooLargeError, 400, "file_too_large", "File too large"),
    (InvalidRequestError, 400, "invalid_parameters", "Invalid parameters given"),
    (RequestTimeoutError, 408, "request_timeout", "Request body not received in time"),
    (OverloadedError, 429, "rate_limit_exceeded", "Rate limit exceeded"),
    (DeadlineExceededError, 504, "deadline_exceeded", "Request deadline exceeded"),
)


def removebg_error(exc: BaseException) -> JSONResponse:
    """``exc`` as remove.bg answers errors: ``{"errors": [{"title", "code", "detail"}]}``."""
    exc = unwrap(exc)
    headers = None
    if isinstance(exc, CompatError):
        status, code, title, detail = exc.status, exc.code, exc.title, exc.detail
    elif isinstance(exc, SegmentationError):
        status, code, title = 500, "internal_error", "Internal server error"
        for cls, status_of, code_of, title_of in _REMOVEBG_ERRORS:
            if isinstance(exc, cls):
                status, code, title = status_of, code_of, title_of
                break
        detail = exc.message
        if exc.retry_after_s:
            headers = {"Retry-After": str(exc.retry_after_s)}
    else:
        status, code, title, detail = 500, "internal_error", "Internal server error", None
    error: dict[str, str] = {"title": title, "code": code}
    if detail:
        error["detail"] = detail
    return JSONResponse({"errors": [error]}, status_code=status, headers=headers)


def foreground_position(box: tuple[int, int, int, int] | None) -> dict[str, int]:
    """remove.bg's foreground position (``top``, ``left``, ``width``, ``height``, pixels of
    the result image) of the box ``(left, top, right, bottom)`` the replica found there;
    nothing when it found none (scaling left none of a faint subject)."""
    if box is None:
        return {}
    left, top, right, bottom = box
    return {"top": top, "left": left, "width": right - left, "height": bottom - top}


async def removebg(request: Request) -> Response:
    """remove.bg's ``POST /v1.0/removebg``; see the module doc."""
    try:
        return await _removebg(request)
    except Exception as exc:  # every error in remove.bg's shape, on this route only
        return removebg_error(exc)


async def _removebg(request: Request) -> Response:
    _authorize(request)
    deadline = _deadline(request)
    service = _service(request)
    asked = RemoveBgRequest(wants_json="application/json" in request.headers.get("accept", ""))

    async def read(charge: Charge) -> tuple[bytes, CutoutOptions]:
        body = await read_body(request, service.max_body_bytes, charge)
        fields = await _fields(request, body, charge)
        parsed = removebg_options(fields)
        asked.options, asked.foreground_type, asked.type_level = (
            parsed.options,
            parsed.foreground_type,
            parsed.type_level,
        )
        return _removebg_image(fields, charge), parsed.options

    out = await service.cutout(read, deadline)
    if out.subject is None:
        raise _invalid(
            "unknown_foreground",
            "Could not identify foreground in image.",
            "The matte is empty: nothing in the image was taken for a foreground.",
        )
    headers = {
        "X-Width": str(out.width),
        "X-Height": str(out.height),
        "X-Credits-Charged": "0",
    }
    if asked.type_level != "none":
        # This service does not classify the foreground: the type asked for, else "other".
        headers["X-Type"] = asked.foreground_type if asked.foreground_type != "auto" else "other"
    position = foreground_position(out.foreground)
    headers.update({f"X-Foreground-{name.title()}": str(value) for name, value in position.items()})
    if asked.wants_json:
        data: dict[str, Any] = {"result_b64": base64.b64encode(out.data).decode("ascii")}
        data.update({f"foreground_{name}": value for name, value in position.items()})
        return JSONResponse({"data": data}, headers=headers)
    return Response(out.data, media_type=out.media_type, headers=headers)


# -- rembg ------------------------------------------------------------------------------------
def _rembg_validation(where: str, name: str, message: str, value: object) -> CompatError:
    error = CompatError(422, "invalid_request", message)
    error.detail = json.dumps(
        [{"type": "value_error", "loc": [where, name], "msg": message, "input": value}]
    )
    return error


def rembg_options(fields: Mapping[str, Any], query: Mapping[str, str]) -> CutoutOptions:
    """rembg server's parameters as :class:`CutoutOptions` (422 in FastAPI's shape for a
    value rembg's server would refuse)."""

    def flag(name: str) -> bool:
        value = fields.get(name, False)
        try:
            return parse_bool(name, value)
        except InvalidRequestError as exc:
            raise _rembg_validation("body", name, str(exc), value) from None

    for name, default, high in (("af", 240, 255), ("ab", 10, 255), ("ae", 10, None)):
        value = fields.get(name, default)
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if number < 0 or (high is not None and number > high):
            limit = f"0-{high}" if high is not None else "0 or more"
            raise _rembg_validation("body", name, f"{name} must be an integer, {limit}", value)
    model = fields.get("model", "u2net")
    if not isinstance(model, str) or not re.search(REMBG_MODEL_PATTERN, model):
        raise _rembg_validation(
            "body", "model", f"String should match pattern '{REMBG_MODEL_PATTERN}'", model
        )
    only_mask = flag("om")
    matting = flag("a")
    clean = flag("ppm")
    background = None
    if query.get("bgc"):
        try:
            background = parse_color(query["bgc"])
        except InvalidRequestError as exc:
            raise _rembg_validation("query", "bgc", str(exc), query["bgc"]) from None
    # As rembg's remove(): only_mask wins over alpha matting and the background colour.
    return CutoutOptions(
        output="mask" if only_mask else "rgba",
        refine=matting and not only_mask,
        background=None if only_mask else background,
        clean_matte=clean,
    )


def rembg_error(exc: BaseException) -> JSONResponse:
    """``exc`` as FastAPI (rembg's server) answers errors: ``{"detail": ...}``."""
    exc = unwrap(exc)
    headers: dict[str, str] | None = None
    if isinstance(exc, CompatError):
        detail: Any = json.loads(exc.detail) if exc.detail else exc.title
        return JSONResponse({"detail": detail}, status_code=exc.status)
    if isinstance(exc, SegmentationError):
        status = http_status(exc)
        if exc.retry_after_s:
            headers = {"Retry-After": str(exc.retry_after_s)}
        if isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


async def rembg(request: Request) -> Response:
    """rembg's ``POST /api/remove``; see the module doc."""
    try:
        return await _rembg(request)
    except Exception as exc:
        return rembg_error(exc)


async def _rembg(request: Request) -> Response:
    _authorize(request)
    deadline = _deadline(request)
    service = _service(request)
    query = dict(parse_qsl(request.url.query))

    async def read(charge: Charge) -> tuple[bytes, CutoutOptions]:
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith("multipart/form-data"):
            raise _rembg_validation(
                "body", "file", "send the image as multipart/form-data field 'file'", None
            )
        body = await read_body(request, service.max_body_bytes, charge)
        fields = await _fields(request, body, charge)
        options = rembg_options(fields, query)
        data = fields.get("file")
        if not isinstance(data, bytes):
            raise _rembg_validation("body", "file", "Field required", None)
        return data, options

    out = await service.cutout(read, deadline)
    return Response(out.data, media_type="image/png")


def document(schema: dict[str, Any]) -> None:
    """Add the drop-ins' security scheme to a generated OpenAPI ``schema``."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["XApiKey"] = X_API_KEY_SCHEME


def install(app: FastAPI, bearer_scheme: str) -> None:
    """Add both drop-in routes to ``app``; each takes the service's Bearer key
    (``bearer_scheme``) or ``X-Api-Key``."""
    security: list[dict[str, list[str]]] = [{bearer_scheme: []}, {"XApiKey": []}]
    for path, endpoint, extra, summary in (
        (REMOVEBG_PATH, removebg, REMOVEBG_OPENAPI, "remove.bg-compatible background removal"),
        (REMBG_PATH, rembg, REMBG_OPENAPI, "rembg-compatible background removal"),
    ):
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_class=Response,
            summary=summary,
            description=(endpoint.__doc__ or "") + "\n\n" + (__doc__ or "").split("\n\n")[1],
            openapi_extra={**extra, "security": security},
            tags=["drop-in"],
        )
