"""The router's multipart reader (``file_parts``) against Starlette's form parser: the same
files of the same field, in order, on bodies whose data looks like the boundary; and its
refusals (too many files: 413; too many fields, no name, no boundary, malformed: 422)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from segmentation.errors import InvalidRequestError, PayloadTooLargeError
from segmentation_service.inputs import file_parts, parse_form


def encoded(
    files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str] | None = None
) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def starlette_files(content_type: str, body: bytes, field: str) -> list[bytes]:
    scope = {
        "type": "http",
        "method": "POST",
        "headers": [(b"content-type", content_type.encode())],
    }

    async def parse() -> list[bytes]:
        form = await parse_form(Request(scope), body, max_files=1000, max_fields=1000)
        return [await f.read() for f in form.getlist(field) if isinstance(f, UploadFile)]

    return asyncio.run(parse())


def tricky_payloads(boundary: bytes, rng: random.Random) -> list[bytes]:
    """Data with CR LF, dashes and partial boundaries in it, and random bytes."""
    return [
        b"",
        b"\r\n",
        b"--" + boundary[:-1],
        b"\r\n--" + boundary[:-1] + b"x\r\n--",
        bytes(rng.randrange(256) for _ in range(70_000)),
        b"\xff\xd8\xff" + b"\r\n-" * 5000 + b"\xff\xd9",
    ]


def test_the_files_of_one_field_are_those_starlette_finds() -> None:
    rng = random.Random(0)
    content_type, _ = encoded([("frames", ("a.jpg", b"x", "image/jpeg"))])
    boundary = content_type.split("boundary=")[1].encode()
    payloads = tricky_payloads(boundary, rng)
    assert not any(boundary in p for p in payloads)
    files = [("frames", (f"f{i}.jpg", p, "image/jpeg")) for i, p in enumerate(payloads)]
    files.insert(2, ("other", ("o.jpg", b"not a frame", "image/jpeg")))
    content_type, body = encoded(files, data={"frames": "a text field", "note": "x"})
    got = file_parts(content_type, body, "frames", max_files=100, max_fields=100)
    assert got == payloads
    assert got == starlette_files(content_type, body, "frames")
    assert file_parts(content_type, body, "other", 100, 100) == [b"not a frame"]
    assert file_parts(content_type, body, "missing", 100, 100) == []


def test_too_many_files_of_any_field_is_413() -> None:
    files = [(name, (f"{i}.jpg", b"x", "image/jpeg")) for i, name in enumerate("aabb")]
    content_type, body = encoded(files)
    assert len(file_parts(content_type, body, "a", max_files=4, max_fields=0)) == 2
    with pytest.raises(PayloadTooLargeError, match="at most 2"):
        file_parts(content_type, body, "a", max_files=3, max_fields=0)


def test_too_many_fields_is_422() -> None:
    content_type, body = encoded(
        [("frames", ("f.jpg", b"x", "image/jpeg"))], data={f"k{i}": "v" for i in range(5)}
    )
    assert file_parts(content_type, body, "frames", max_files=2, max_fields=5) == [b"x"]
    with pytest.raises(InvalidRequestError, match="more than 4 fields"):
        file_parts(content_type, body, "frames", max_files=2, max_fields=4)


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/form-data", b"--x\r\n\r\n", "Missing boundary"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; filename="a.jpg"\r\n\r\nabc\r\n--x--\r\n',
            'no "name"',
        ),
        ("multipart/form-data; boundary=x", b"--y\r\nnot a multipart body", "malformed"),
    ],
)
def test_a_malformed_body_is_422_saying_what_is_wrong(
    content_type: str, body: bytes, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        file_parts(content_type, body, "frames", max_files=10, max_fields=10)
