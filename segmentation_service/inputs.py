"""Reading images out of HTTP requests, with size limits enforced while reading.

Every read takes a ``charge(n)`` callback (``admission.ByteBudget``): the bytes a router
replica holds are counted as they arrive, so many large bodies at once get 503, not the
router's memory.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message

from segmentation.errors import (
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

RAW_TYPES = ("image/", "application/octet-stream")


Charge = Callable[[int], None]


def _no_charge(size: int) -> None:
    """A ``charge`` that counts nothing (callers outside the router)."""


async def read_body(request: Request, limit: int, charge: Charge = _no_charge) -> bytes:
    """The request body, refusing it as soon as it grows past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
        charge(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form_files(
    request: Request,
    field: str,
    limit: int,
    max_files: int,
    max_files_setting: str = "",
    charge: Charge = _no_charge,
) -> list[bytes]:
    """Files of a multipart ``field``, the whole body bounded by ``limit`` bytes and the files
    by ``max_files`` (413 above it; ``max_files_setting`` names the setting in the message)."""
    setting = f"{max_files_setting}=" if max_files_setting else ""
    too_many = f"the limit is {setting}{max_files}"
    body = await read_body(request, limit, charge)
    charge(len(body))  # the parsed files are a second copy
    try:
        form = await parse_form(request, body, max_files=max_files + 1, max_fields=max_files + 16)
    except PayloadTooLargeError:
        raise PayloadTooLargeError(f"too many files in {field!r}; {too_many}") from None
    files = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
    if not files:
        raise InvalidRequestError(f"multipart body has no file field {field!r}")
    if len(files) > max_files:
        raise PayloadTooLargeError(f"{len(files)} files in {field!r}; {too_many}")
    return [await item.read() for item in files]


async def parse_form(request: Request, body: bytes, max_files: int, max_fields: int) -> FormData:
    """The multipart or url-encoded form of ``request`` whose ``body`` was read already (within
    its limit); 413 past ``max_files`` files, 422 for a malformed body."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, receive=replay).form(
            max_files=max_files, max_fields=max_fields
        )
    except HTTPException as exc:  # Starlette's answer to a MultiPartException
        if "Too many files" in str(exc.detail):
            raise PayloadTooLargeError(f"too many files: at most {max_files - 1}") from None
        raise InvalidRequestError(f"malformed form body: {exc.detail}") from None
    except Exception as exc:
        raise InvalidRequestError(f"malformed form body: {exc}") from None


async def read_image(request: Request, limit: int, charge: Charge = _no_charge) -> bytes:
    """One image: the raw body (``Content-Type: image/...``) or multipart field ``image``."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        (data,) = await read_form_files(request, "image", limit, max_files=1, charge=charge)
    elif content_type.startswith(RAW_TYPES) or not content_type:
        data = await read_body(request, limit, charge)
    else:
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type!r} is not accepted: send the image as the raw body with "
            "an image/* Content-Type, or as multipart/form-data field 'image'"
        )
    if not data:
        raise InvalidImageError("empty body: send the image bytes")
    return data
