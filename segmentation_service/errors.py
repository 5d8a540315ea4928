"""One place that turns exceptions into HTTP answers: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from segmentation.errors import (
    DeadlineExceededError,
    InvalidImageError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    SegmentationError,
    UnsupportedMediaTypeError,
)

logger = logging.getLogger("ray.serve")


class UnauthorizedError(SegmentationError):
    """The API key is missing or wrong."""

    code = "unauthorized"


class RequestTimeoutError(SegmentationError):
    """The request's body did not arrive within ``router.body_timeout_s``."""

    code = "request_timeout"


#: The HTTP status of each typed error; a subclass takes its nearest listed ancestor's.
HTTP_STATUS: dict[type[SegmentationError], int] = {
    InvalidImageError: 400,
    UnauthorizedError: 401,
    RequestTimeoutError: 408,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidRequestError: 422,
    OverloadedError: 503,
    DeadlineExceededError: 504,
    SegmentationError: 500,
}


def http_status(exc: SegmentationError) -> int:
    """The status code ``exc`` is answered with."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


#: The gRPC status code name of each typed error (see segmentor.proto): too large is
#: RESOURCE_EXHAUSTED without a retry delay, as gRPC itself answers an oversized message;
#: overloaded is RESOURCE_EXHAUSTED with ``retry-after`` in the trailing metadata.
GRPC_STATUS: dict[type[SegmentationError], str] = {
    InvalidImageError: "INVALID_ARGUMENT",
    UnauthorizedError: "UNAUTHENTICATED",
    RequestTimeoutError: "DEADLINE_EXCEEDED",
    PayloadTooLargeError: "RESOURCE_EXHAUSTED",
    UnsupportedMediaTypeError: "INVALID_ARGUMENT",
    InvalidRequestError: "INVALID_ARGUMENT",
    OverloadedError: "RESOURCE_EXHAUSTED",
    DeadlineExceededError: "DEADLINE_EXCEEDED",
    SegmentationError: "INTERNAL",
}


def grpc_status(exc: SegmentationError) -> str:
    """The name of the ``grpc.StatusCode`` that ``exc`` is answered with."""
    for cls in type(exc).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return "INTERNAL"


def unwrap(exc: BaseException) -> BaseException:
    """The error a remote replica raised, out of Ray's ``RayTaskError`` wrapper.

    A replica that died or cannot be reached (its process was killed, its node went away)
    loses the frames it held, but Serve starts a new one: those frames are answered 503 with
    a retry delay of a replica's restart, never 500. A full queue is the same, sooner.
    """
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    if isinstance(exc, BackPressureError):
        return OverloadedError("the model's request queue is full; retry shortly", 1)
    if isinstance(exc, DeploymentUnavailableError):
        # A deployment that failed to deploy (DEPLOY_FAILED): a rollout or a restart may
        # bring it back, so it is 503 with a retry delay, and the message says which.
        return OverloadedError(f"a model deployment is unavailable now: {exc}; retry later", 10)
    if isinstance(exc, (RayActorError, WorkerCrashedError, ReplicaUnavailableError)):
        # Serve notices the death within a second and starts a replacement; 2 s is about
        # a stand-in's restart, and the client's retries span a real model's 10-30 s reload.
        return OverloadedError(
            "the model replica holding this frame stopped; it is being restarted, retry shortly",
            2,
        )
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return unwrap(cause)
    return exc


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    if isinstance(exc, SegmentationError):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(
            error_body(exc.code, exc.message), status_code=http_status(exc), headers=headers
        )
    logger.exception("unexpected error", exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal error"), status_code=500)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(SegmentationError)
    async def _segmentation_error(request: Request, exc: SegmentationError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}: {err['msg']}"
            for err in exc.errors()
        )
        return JSONResponse(error_body("invalid_request", problems), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keep the headers the exception carries: a 405 names the allowed methods in
        # ``Allow`` (RFC 9110, section 15.5.6).
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
