"""Typed errors with the HTTP status they map to.

Arguments are plain strings and ints so the exceptions pickle across Ray handles; the router
maps every one of them to ``{"error": {"code", "message"}}`` in a single exception handler.
"""

from __future__ import annotations


class SegmentationError(Exception):
    """Base class: a request could not be served, for a reason the client should know."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (self.message, self.retry_after_s))


class InvalidImageError(SegmentationError):
    """The body is not a decodable image (corrupt, truncated, empty, not an image)."""

    status_code = 400
    code = "invalid_image"


class InvalidRequestError(SegmentationError):
    """A query parameter or form field has a value that is not accepted."""

    status_code = 422
    code = "invalid_request"


class UnsupportedMediaTypeError(SegmentationError):
    """The content type or image format is not one the service decodes."""

    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLargeError(SegmentationError):
    """The body or the decoded image is over a configured limit."""

    status_code = 413
    code = "payload_too_large"


class UnauthorizedError(SegmentationError):
    """The API key is missing or wrong."""

    status_code = 401
    code = "unauthorized"


class OverloadedError(SegmentationError):
    """The service cannot take the request now; retry after ``retry_after_s``."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int | None = 1) -> None:
        super().__init__(message, retry_after_s)


class DeadlineExceededError(SegmentationError):
    """The request's deadline passed before it reached the GPU."""

    status_code = 504
    code = "deadline_exceeded"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to set or where to put weights."""
