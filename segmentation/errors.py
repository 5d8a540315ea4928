"""Typed errors of the library: what went wrong, in words a caller can act on.

Each error has a stable ``code`` and, when retrying can succeed, ``retry_after_s``. The library
knows nothing of HTTP: the service maps these classes to status codes in one place
(``segmentation_service.errors``). Arguments are plain strings and ints so the exceptions
pickle across Ray handles intact.
"""

from __future__ import annotations


class SegmentationError(Exception):
    """Base class: a frame could not be segmented, for a reason the caller should know."""

    code = "internal_error"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (self.message, self.retry_after_s))


class InvalidImageError(SegmentationError):
    """The bytes are not a decodable image (corrupt, truncated, empty, not an image)."""

    code = "invalid_image"


class InvalidRequestError(SegmentationError):
    """An option has a value that is not accepted."""

    code = "invalid_request"


class UnsupportedMediaTypeError(SegmentationError):
    """The content type or image format is not one the library decodes."""

    code = "unsupported_media_type"


class PayloadTooLargeError(SegmentationError):
    """The data or the decoded image is over a configured limit."""

    code = "payload_too_large"


class OverloadedError(SegmentationError):
    """The frame cannot run now (no GPU memory, a full queue); retry after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int | None = 1) -> None:
        super().__init__(message, retry_after_s)


class DeadlineExceededError(SegmentationError):
    """The frame's deadline passed before it reached the model."""

    code = "deadline_exceeded"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to set or where to put weights."""
