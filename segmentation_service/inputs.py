"""Reading images out of HTTP requests, with size limits enforced while reading.

Every read takes a ``charge(n)`` callback (``admission.ByteBudget``): the bytes a router
replica holds are counted as they arrive, so many large bodies at once get 503, not the
router's memory.
"""

from __future__ import annotations

from collections.abc import Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import FormData
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
        files = file_parts(
            request.headers.get("content-type", ""),
            body,
            field,
            max_files=max_files + 1,
            max_fields=max_files + 16,
        )
    except PayloadTooLargeError:
        raise PayloadTooLargeError(f"too many files in {field!r}; {too_many}") from None
    if not files:
        raise InvalidRequestError(f"multipart body has no file field {field!r}")
    if len(files) > max_files:
        raise PayloadTooLargeError(f"{len(files)} files in {field!r}; {too_many}")
    return files


class _FileParts:
    """python-multipart's callbacks, keeping the files (parts with a ``filename``) of one
    field as views of the body until each part ends, then one copy each. Starlette's form
    parser copies each file into a spooled file (on disk past 1 MB) and back out again."""

    def __init__(self, field: str, max_files: int, max_fields: int) -> None:
        self.field = field.encode()
        self.max_files, self.max_fields = max_files, max_fields
        self.files: list[bytes] = []
        self.file_count = self.field_count = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._chunks: list[memoryview] = []
        self._keep = False

    def on_part_begin(self) -> None:
        self._disposition, self._chunks, self._keep = b"", [], False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequestError(
                'malformed form body: a part\'s Content-Disposition has no "name"'
            )
        if b"filename" in options:
            self.file_count += 1
            if self.file_count > self.max_files:
                raise PayloadTooLargeError(f"too many files: at most {self.max_files - 1}")
            self._keep = options[b"name"] == self.field
        else:
            self.field_count += 1
            if self.field_count > self.max_fields:
                raise InvalidRequestError(
                    f"malformed form body: more than {self.max_fields} fields"
                )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self._chunks.append(memoryview(data)[start:end])

    def on_part_end(self) -> None:
        if self._keep:
            self.files.append(b"".join(self._chunks))
        self._chunks = []


def file_parts(
    content_type: str, body: bytes, field: str, max_files: int, max_fields: int
) -> list[bytes]:
    """The files of multipart ``field`` in ``body``, in order (other fields, and parts
    without a filename, are passed over); 413 past ``max_files`` files of any field, 422
    past ``max_fields`` other fields or for a malformed body."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("malformed form body: Missing boundary in multipart.")
    parts = _FileParts(field, max_files, max_fields)
    callbacks = {
        name: getattr(parts, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequestError(f"malformed form body: {exc}") from None
    return parts.files


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
