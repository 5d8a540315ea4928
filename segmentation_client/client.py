"""Python client of the service: sync and async, typed results, retries that honour Retry-After.

>>> with SegmentorClient("http://localhost:8000") as client:
...     cutout = client.remove_background("frame.jpg")          # Image (RGBA PNG)
...     found = client.segment(frame_array, conf=0.4)           # Segmentation
...     rgba = cutout.to_array()                                # uint8 HxWx4

An overloaded service answers 503 (or 429) with ``Retry-After``; the client waits that long
(or backs off exponentially, with jitter, when the header is missing) and sends the frame
again, so a burst never loses a frame. Any other 4xx raises :class:`ServiceError` at once with
the service's own error code and message. ``max_concurrency`` bounds the requests in flight
from one client, whatever the number of threads or tasks using it. ``timeout_s`` bounds each
call as a whole: the wait for a free connection, retries and waits, slow uploads and answers
that trickle in; the service is told the time left (``X-Request-Timeout-Ms``) so it drops
frames nobody waits for any more.

Every failure is a :class:`ServiceError`, whose original exception (httpx's, grpc's) is its
``__cause__``: no answer in time is :class:`ServiceTimeout`, no service to answer
:class:`ServiceUnreachable`. Until the service has answered once, connection failures are
retried for ``connect_timeout_s`` only, so a wrong URL fails in seconds.

A ``grpc://host:9000`` URL uses the gRPC API instead (the ``grpc`` extra): the same methods,
results, retries and errors (``ServiceError.status`` is then the gRPC code name, e.g.
``INVALID_ARGUMENT``); ``products`` and ``models`` are HTTP-only.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpcore
import httpx
import numpy as np
from PIL import Image as PILImage

from segmentation_client.wire import decode_rle, jpeg, union_matte

if TYPE_CHECKING:
    from segmentation_client.grpc_transport import AsyncGrpcTransport, GrpcTransport

T = TypeVar("T")
#: What can be sent as an image: encoded bytes, a file path, a uint8 RGB array or a PIL image.
ImageInput = bytes | str | os.PathLike[str] | np.ndarray | PILImage.Image
Task = Literal["remove-background", "segment"]
Output = Literal["rgba", "mask"]

RETRY_STATUSES = (429, 503)
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: The status of a call that got no answer in time, and of one that reached no service: what
#: a gateway in front of the service answers for the same failures (gRPC: the code names).
TIMEOUT_STATUS = 504
UNREACHABLE_STATUS = 503


class ServiceError(Exception):
    """An error answer of the service, a request that ran out of retries, or no answer at all.

    ``status`` is the HTTP status (an int) or the gRPC code name (e.g. ``INVALID_ARGUMENT``);
    ``code`` the service's error code (``invalid_image``, ``overloaded``...) or, when the
    service could not answer, ``deadline_exceeded`` / ``unreachable``. The two failures that
    come without an answer have their own subclasses, the same on both transports:
    :class:`ServiceTimeout` and :class:`ServiceUnreachable`.
    """

    def __init__(self, status: int | str, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status, self.code, self.message)


class ServiceTimeout(ServiceError):
    """No answer within the call's ``timeout_s``: noticed by the client (status 504 or
    ``DEADLINE_EXCEEDED``, code ``deadline_exceeded``) or by the service, which was told the
    time left and answered 504 / ``DEADLINE_EXCEEDED`` (408 when the upload was too slow)."""


class ServiceUnreachable(ServiceError):
    """No service answered: the connection was refused, not made within ``connect_timeout_s``,
    or broke before the answer (status 503 or ``UNAVAILABLE``, code ``unreachable``)."""


def answer_error(status: int | str, code: str, message: str) -> ServiceError:
    """The error of an error answer of the service, typed by its status."""
    if status in (408, TIMEOUT_STATUS, "DEADLINE_EXCEEDED"):
        return ServiceTimeout(status, code, message)
    return ServiceError(status, code, message)


def timeout_error(status: int | str, where: str, timeout_s: float, why: str = "") -> ServiceTimeout:
    """The error of a call that had no answer from ``where`` within ``timeout_s``."""
    message = f"no answer from {where} within the client's timeout of {timeout_s:g} s"
    return ServiceTimeout(status, "deadline_exceeded", f"{message}{why}")


def unreachable_error(status: int | str, where: str, why: str) -> ServiceUnreachable:
    """The error of a call that reached no service at ``where``."""
    return ServiceUnreachable(status, "unreachable", f"cannot reach the service at {where}: {why}")


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """An encoded image answer (PNG unless a cutout option chose WebP or JPEG): an RGBA
    cutout, an RGB one on an opaque background, or a grayscale matte."""

    data: bytes
    content_type: str = "image/png"
    #: With ``crop=True``: the frame pixels the image covers, ``(left, top, right, bottom)``
    #: (the subject plus its margin; may reach past the frame's edge).
    cutout_box: tuple[int, int, int, int] | None = None

    def to_array(self) -> np.ndarray:
        """Decoded pixels: uint8 ``HxWx4`` for a cutout, ``HxW`` for a matte."""
        with PILImage.open(io.BytesIO(self.data)) as image:
            return np.asarray(image)

    def alpha(self) -> np.ndarray:
        """The uint8 ``HxW`` alpha matte, whether this is a cutout or a matte (255 everywhere
        for a cutout on an opaque background)."""
        pixels = self.to_array()
        if pixels.ndim == 2:
            return pixels
        if pixels.shape[2] == 4:
            return pixels[..., 3]
        return np.full(pixels.shape[:2], 255, dtype=np.uint8)


@dataclass(frozen=True)
class Instance:
    """One detected object: box (xyxy pixels), score, class, COCO RLE mask."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str
    rle: dict[str, Any] = field(repr=False)

    def mask(self) -> np.ndarray:
        """The uint8 ``HxW`` mask (0 or 1) at the frame's size."""
        return decode_rle(self.rle)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Instance:
        x1, y1, x2, y2 = (float(v) for v in data["box"])
        return cls(
            box=(x1, y1, x2, y2),
            score=float(data["score"]),
            class_id=int(data["class_id"]),
            class_name=str(data["class_name"]),
            rle=data["mask"],
        )


@dataclass(frozen=True)
class Segmentation:
    """All instances found in a ``width`` x ``height`` frame."""

    width: int
    height: int
    model: str
    instances: list[Instance]

    def union_mask(self) -> np.ndarray:
        """uint8 ``HxW``: 255 where any instance is, 0 elsewhere."""
        return union_matte(self.height, self.width, (i.rle for i in self.instances))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segmentation:
        return cls(
            width=int(data["width"]),
            height=int(data["height"]),
            model=str(data.get("model", "")),
            instances=[Instance.from_json(i) for i in data["instances"]],
        )


@dataclass(frozen=True)
class Product:
    """An object YOLO found and RMBG-2.0 cut out of ``crop_box`` (a region of the frame)."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str
    crop_box: tuple[int, int, int, int]
    cutout: Image = field(repr=False)
    #: Frame pixels the cutout image covers: ``crop_box``, or the subject plus its margin
    #: when the cutout was cropped (``crop=True``); may reach past the frame's edge.
    cutout_box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Products:
    width: int
    height: int
    products: list[Product]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Products:
        products = []
        for p in data["products"]:
            x1, y1, x2, y2 = (float(v) for v in p["box"])
            c1, c2, c3, c4 = (int(v) for v in p["crop_box"])
            covered = p.get("cutout_box") or p["crop_box"]
            k1, k2, k3, k4 = (int(v) for v in covered)
            products.append(
                Product(
                    box=(x1, y1, x2, y2),
                    score=float(p["score"]),
                    class_id=int(p["class_id"]),
                    class_name=str(p["class_name"]),
                    crop_box=(c1, c2, c3, c4),
                    cutout=Image(_b64decode(p["cutout"]), p.get("media_type", "image/png")),
                    cutout_box=(k1, k2, k3, k4),
                )
            )
        return cls(width=int(data["width"]), height=int(data["height"]), products=products)


@dataclass(frozen=True)
class FrameError:
    """A frame of a multi-frame request that failed on its own (the others did not)."""

    index: int
    code: str
    message: str


FrameResult = Image | Segmentation | FrameError


def _b64decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def parse_frames(data: dict[str, Any]) -> list[FrameResult]:
    """Entries of a ``/v1/frames`` answer, in input order."""
    results: list[FrameResult] = []
    for entry in data["frames"]:
        if "error" in entry:
            error = entry["error"]
            results.append(FrameError(int(entry["index"]), error["code"], error["message"]))
        elif data["task"] == "segment":
            results.append(Segmentation.from_json(entry))
        else:
            box = entry.get("cutout_box")
            results.append(
                Image(
                    _b64decode(entry["image"]),
                    entry.get("content_type", "image/png"),
                    cutout_box=_box(box) if box else None,
                )
            )
    return results


# -- requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait when the service is overloaded or unreachable.

    Args:
        attempts: tries per request in all (the first one included).
        backoff_s: first wait when the answer has no ``Retry-After``; doubles each time.
        max_wait_s: longest single wait, whatever ``Retry-After`` asks for.
    """

    attempts: int = 10
    backoff_s: float = 0.2
    max_wait_s: float = 30.0

    def wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 1)."""
        asked = parse_retry_after(retry_after)
        if asked is None:
            asked = self.backoff_s * 2 ** (attempt - 1)
        # Jitter spreads clients that were told the same Retry-After over the next second.
        return min(self.max_wait_s, asked + random.uniform(0, min(1.0, asked)))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class _Request:
    """One HTTP request, ready to send (and to resend on a retry)."""

    path: str
    params: dict[str, Any]
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    method: str = "POST"

    def send_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.files is not None:
            kwargs["files"] = self.files
        else:
            kwargs["content"] = self.content
        return kwargs


def _retryable(response: httpx.Response | None) -> bool:
    return response is None or response.status_code in RETRY_STATUSES


def _retry_after(response: httpx.Response | None) -> str | None:
    return None if response is None else response.headers.get("retry-after")


def _image(response: httpx.Response) -> Image:
    box = response.headers.get("x-cutout-box")
    return Image(
        response.content,
        response.headers.get("content-type", "image/png"),
        cutout_box=_box(box.split(",")) if box else None,
    )


def _box(values: Sequence[Any]) -> tuple[int, int, int, int]:
    left, top, right, bottom = (int(v) for v in values)
    return left, top, right, bottom


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    code, message = "http_error", response.text[:500]
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise answer_error(response.status_code, code, message)


# -- one deadline for every socket operation of a call -------------------------------------
#: When the call running in this thread (or task) must end, on ``time.monotonic()``'s clock.
_CALL_DEADLINE: ContextVar[float | None] = ContextVar("segmentation_call_deadline", default=None)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to the time left of the current call; raises ``expired`` when none is."""
    deadline = _CALL_DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the call's timeout passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, send and handshake ends by the calling thread's deadline.

    httpx's timeouts are per socket operation: each read may take ``timeout``, so a body that
    trickles in a byte every 50 ms kept a call with ``timeout_s=1`` going for 3.7 s, and
    would have for ever. Here each operation gets what is left of the call's deadline.
    """

    def __init__(self, stream: httpcore.NetworkStream, tls_layers: int = 0) -> None:
        self._stream = stream
        self._tls_layers = tls_layers

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        sock = self._stream.get_extra_info("socket")
        if self._tls_layers > 1 or not isinstance(sock, socket.socket):
            # TLS inside TLS (through an HTTPS proxy): the socket is not ours to write to.
            self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))
            return
        # httpcore gives each send() of its loop the same timeout, so a peer that reads a
        # byte now and then keeps one write going; here each send() gets the time left.
        view = memoryview(buffer)
        while view:
            sock.settimeout(_left(timeout, httpcore.WriteTimeout))
            try:
                sent = sock.send(view)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(str(exc)) from exc
            except OSError as exc:
                raise httpcore.WriteError(str(exc)) from exc
            view = view[sent:]

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _left(timeout, httpcore.ConnectTimeout)
        stream = self._stream.start_tls(ssl_context, server_hostname, timeout)
        return _DeadlineStream(stream, self._tls_layers + 1)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpx's own network backend, with each connection a :class:`_DeadlineStream`."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        timeout = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncDeadlineStream(httpcore.AsyncNetworkStream):
    """The asyncio flavour of :class:`_DeadlineStream` (anyio bounds a whole write already)."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        timeout = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncDeadlineStream(
            await self._stream.start_tls(ssl_context, server_hostname, timeout)
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _AsyncDeadlineBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        timeout = _left(timeout, httpcore.ConnectTimeout)
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncDeadlineStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        timeout = _left(timeout, httpcore.ConnectTimeout)
        stream = await self._backend.connect_unix_socket(path, timeout, socket_options)
        return _AsyncDeadlineStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def _bound_by_call_deadline(http: httpx.Client | httpx.AsyncClient) -> None:
    """Put every connection of ``http`` under the deadline of the call that uses it.

    httpx takes no network backend; the httpcore pools it builds do (its direct transport's,
    and those of proxies set in the environment), so the backend is wrapped there.
    """
    wrap: Callable[[Any], Any] = (
        _AsyncDeadlineBackend if isinstance(http, httpx.AsyncClient) else _DeadlineBackend
    )
    transports = [getattr(http, "_transport", None), *getattr(http, "_mounts", {}).values()]
    pools = [getattr(transport, "_pool", None) for transport in transports]
    bounded: list[Any] = [pool for pool in pools if hasattr(pool, "_network_backend")]
    if not bounded:
        raise RuntimeError(
            f"httpx {httpx.__version__} builds its connections in a way this client does not "
            "know, so timeout_s could not bound a call; install httpx 0.27 or 0.28"
        )
    for pool in bounded:
        pool._network_backend = wrap(pool._network_backend)


def _root_cause(exc: BaseException) -> str:
    """The first cause that says why, e.g. ``[Errno 111] Connection refused`` where asyncio's
    backend says only "All connection attempts failed"."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"[Errno {seen.errno}] {os.strerror(seen.errno)}"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


class _Base:
    """What the sync and async clients share: settings, request building, answer parsing.

    Args:
        base_url: where the service listens, e.g. ``http://localhost:8000``, or
            ``grpc://localhost:9000`` for the gRPC API.
        api_key: sent as ``Authorization: Bearer`` when the service requires one.
        max_concurrency: requests in flight at once from this client.
        retry: retry policy for 503/429 answers and connection failures.
        timeout_s: the longest a call may take, from sending to the last byte of the
            answer: the wait for a free connection, every retry and wait, slow uploads and
            slow answers included. Past it: :class:`ServiceTimeout`.
        connect_timeout_s: the longest wait for a connection. Until the service has answered
            once, connection failures are retried only this long, so a wrong URL or a
            service that is down fails in seconds (:class:`ServiceUnreachable`), not after
            ``timeout_s``; later, they are retried within ``timeout_s`` (a restart).
        frame_format: how arrays and PIL images are encoded for upload (JPEG is ~10x faster
            to encode and upload than PNG; PNG is lossless).
        jpeg_quality: JPEG quality of those uploads.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        frame_format: Literal["jpeg", "png"] = "jpeg",
        jpeg_quality: int = 95,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeout_s and connect_timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.frame_format = frame_format
        self.jpeg_quality = jpeg_quality
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        #: Answers that asked to retry (503/429) or failed to connect, over the client's life.
        self.retries = 0
        #: Whether the service has answered this client once (see ``connect_timeout_s``).
        self._reached = False
        self._open(httpx.Limits(max_connections=max_concurrency))

    @property
    def uses_grpc(self) -> bool:
        return self.base_url.startswith("grpc://")

    @property
    def _http_base_url(self) -> str:
        """Base URL of the HTTP client (a gRPC client never sends on it: HTTP-only calls raise)."""
        return (
            "http://" + self.base_url.removeprefix("grpc://") if self.uses_grpc else self.base_url
        )

    def _http_only(self, what: str) -> None:
        if self.uses_grpc:
            raise ValueError(f"{what} is not in the gRPC API: use the service's http:// URL")

    def _expired(self, request: _Request, why: str = "") -> ServiceTimeout:
        where = f"{self.base_url}{request.path}"
        return timeout_error(TIMEOUT_STATUS, where, self.timeout_s, why)

    def _busy(self, request: _Request) -> ServiceTimeout:
        why = f" (all {self.max_concurrency} connections of max_concurrency stayed busy)"
        return self._expired(request, why)

    def _remaining(self, request: _Request, deadline: float) -> float:
        """Seconds left before ``deadline``; raises :class:`ServiceTimeout` when none are."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._expired(request)
        return remaining

    def _attempt(self, request: _Request, deadline: float) -> dict[str, Any]:
        """Keyword arguments of one try, with the time left of ``deadline``; raises when
        none is left."""
        remaining = self._remaining(request, deadline)
        kwargs = request.send_kwargs()
        ms = str(max(1, int(remaining * 1000)))
        kwargs["headers"] = {**kwargs["headers"], "X-Request-Timeout-Ms": ms}
        # Each socket operation is cut to the call's deadline as well (_DeadlineStream).
        kwargs["timeout"] = httpx.Timeout(remaining, connect=min(remaining, self.connect_timeout_s))
        return kwargs

    def _next_wait(
        self, attempt: int, response: httpx.Response | None, started: float, deadline: float
    ) -> float:
        """Seconds before the next try after this attempt's ``response`` (None: no answer),
        or -1 when there is none: the answer is final, the tries are spent, or the wait
        would end past ``deadline`` (or, until the service has answered once, past
        ``connect_timeout_s`` after the call started). Decided once per attempt (the wait
        has jitter)."""
        if response is not None:
            self._reached = True
            if not _retryable(response):
                return -1.0
        if attempt >= self.retry.attempts:
            return -1.0
        limit = deadline if self._reached else min(deadline, started + self.connect_timeout_s)
        wait = self.retry.wait(attempt, _retry_after(response))
        return -1.0 if time.monotonic() + wait >= limit else wait

    def _failed(
        self, request: _Request, exc: httpx.TransportError, deadline: float
    ) -> ServiceError:
        """The error of a call whose last try got no answer. A connection attempt that the
        call's deadline cut short is a timeout: given its ``connect_timeout_s`` in full, it
        might have connected."""
        connecting = isinstance(exc, httpx.ConnectTimeout)
        if isinstance(exc, httpx.TimeoutException) and (
            not connecting or self._connect_cut_short(exc, deadline)
        ):
            return self._expired(request)
        if connecting:
            why = f"no connection within {self.connect_timeout_s:g} s"
        elif isinstance(exc, httpx.ConnectError):
            why = _root_cause(exc)
        else:
            why = f"the connection broke before the answer ({exc or type(exc).__name__})"
        return unreachable_error(UNREACHABLE_STATUS, self.base_url, why)

    def _connect_cut_short(self, exc: httpx.TransportError, deadline: float) -> bool:
        """Whether the call's deadline, not ``connect_timeout_s``, ended this connecting."""
        try:
            given = exc.request.extensions.get("timeout", {}).get("connect")
        except RuntimeError:  # an exception raised without its request
            given = None
        if given is not None and given < self.connect_timeout_s:
            return True
        return time.monotonic() >= deadline

    def _outcome(
        self,
        request: _Request,
        response: httpx.Response | None,
        failure: Exception | None,
        deadline: float,
    ) -> httpx.Response:
        """The final answer of a call, or its error."""
        if isinstance(failure, httpx.TransportError):
            raise self._failed(request, failure, deadline) from failure
        assert response is not None  # a try ends with an answer or a failure
        _raise_for_error(response)
        return response

    def _open(self, limits: httpx.Limits) -> None:
        """Create the HTTP client and the in-flight bound (sync or async flavour)."""
        raise NotImplementedError

    @staticmethod
    def _grpc_output(output: Output) -> Any:
        from segmentation_client.grpc_transport import OUTPUTS

        return OUTPUTS[output]

    def encode(self, image: ImageInput) -> tuple[bytes, str]:
        """Encoded bytes and content type of any accepted image input."""
        if isinstance(image, bytes):
            return image, sniff_content_type(image)
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as handle:
                data = handle.read()
            return data, sniff_content_type(data)
        if isinstance(image, np.ndarray):
            image = PILImage.fromarray(image)
        if self.frame_format == "png":
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            return buffer.getvalue(), "image/png"
        return jpeg(image, self.jpeg_quality), "image/jpeg"

    def _single(self, path: str, image: ImageInput, params: dict[str, Any]) -> _Request:
        data, content_type = self.encode(image)
        return _Request(path, _clean(params), data, {"Content-Type": content_type})

    def _frames(self, images: Iterable[ImageInput], params: dict[str, Any]) -> _Request:
        files = []
        for index, image in enumerate(images):
            data, content_type = self.encode(image)
            files.append(("frames", (f"frame_{index:06d}", data, content_type)))
        return _Request("/v1/frames", _clean(params), files=files)


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[key] = value
    return out


def _detect_params(
    conf: float | None, iou: float | None, classes: Sequence[int] | None, max_det: int | None
) -> dict[str, Any]:
    return {"conf": conf, "iou": iou, "classes": classes, "max_det": max_det}


def _cutout_params(
    refine: bool | None = None,
    background: str | Sequence[int] | None = None,
    crop: bool | None = None,
    crop_margin: str | int | None = None,
    format: str | None = None,
    quality: int | None = None,
    lossless: bool | None = None,
) -> dict[str, Any]:
    """The cutout options as query parameters (None: the service's default). ``background``:
    a colour as the service reads it (``ffffff``, ``white``) or ``(r, g, b[, a])``."""
    if background is not None and not isinstance(background, str):
        background = ",".join(str(int(c)) for c in background)
    return {
        "refine": refine,
        "background": background,
        "crop": crop,
        "crop_margin": crop_margin,
        "format": format,
        "quality": quality,
        "lossless": lossless,
    }


def pb() -> Any:
    """The generated messages, imported on first use (grpc:// clients only)."""
    from segmentation_client.proto import segmentor_pb2

    return segmentor_pb2


def _grpc_options(
    conf: float | None, iou: float | None, classes: Sequence[int] | None, max_det: int | None
) -> Any:
    from segmentation_client.grpc_transport import detect_options

    return detect_options(conf, iou, classes, max_det)


def _grpc_cutout(cutout: dict[str, Any]) -> Any:
    """The cutout keyword arguments as the proto's ``CutoutOptions``."""
    from segmentation_client.grpc_transport import cutout_options

    return cutout_options(**_cutout_params(**cutout))


def sniff_content_type(data: bytes) -> str:
    """The image type of encoded bytes by their signature (the service checks it too)."""
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class SegmentorClient(_Base):
    """Blocking client; safe to share between threads (at most ``max_concurrency`` in flight).
    Arguments: see :class:`_Base`."""

    def _open(self, limits: httpx.Limits) -> None:
        self._grpc: GrpcTransport | None = None
        if self.uses_grpc:
            from segmentation_client.grpc_transport import GrpcTransport

            self._grpc = GrpcTransport(self)
        self._http = httpx.Client(
            base_url=self._http_base_url,
            headers=self.headers,
            timeout=self.timeout_s,
            limits=limits,
        )
        _bound_by_call_deadline(self._http)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

    def __enter__(self) -> SegmentorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._grpc is not None:
            self._grpc.close()

    def _send(self, request: _Request) -> httpx.Response:
        started = time.monotonic()
        deadline = started + self.timeout_s
        token = _CALL_DEADLINE.set(deadline)
        try:
            attempt = 0
            while True:
                attempt += 1
                response: httpx.Response | None = None
                failure: httpx.TransportError | None = None
                if not self._slots.acquire(timeout=self._remaining(request, deadline)):
                    raise self._busy(request)
                try:
                    kwargs = self._attempt(request, deadline)
                    response = self._http.request(request.method, request.path, **kwargs)
                except httpx.TransportError as exc:
                    failure = exc
                finally:
                    self._slots.release()
                wait = self._next_wait(attempt, response, started, deadline)
                if wait < 0:
                    return self._outcome(request, response, failure, deadline)
                self.retries += 1
                time.sleep(wait)
        finally:
            _CALL_DEADLINE.reset(token)

    def remove_background(self, image: ImageInput, output: Output = "rgba", **cutout: Any) -> Image:
        """RGBA cutout (``output="rgba"``) or grayscale matte (``"mask"``) as PNG. Cutout
        options: ``refine`` (edge colours), ``background`` (``"ffffff"``, ``"white"`` or
        ``(r, g, b[, a])``), ``crop``, ``crop_margin`` (``"10%"``, ``"30px"``), ``format``
        (``png``, ``webp``, ``jpeg``), ``quality``, ``lossless``. With ``crop`` the answer's
        ``cutout_box`` says which frame pixels it covers."""
        params = _clean(_cutout_params(**cutout))
        if self._grpc is not None:
            data, _ = self.encode(image)
            request = pb().ImageRequest(
                image=data, output=self._grpc_output(output), cutout=_grpc_cutout(cutout)
            )
            return self._grpc.image(self._grpc.call("RemoveBackground", request))
        response = self._send(
            self._single("/v1/remove-background", image, {"output": output, **params})
        )
        return _image(response)

    def segment(
        self,
        image: ImageInput,
        *,
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[int] | None = None,
        max_det: int | None = None,
    ) -> Segmentation:
        if self._grpc is not None:
            data, _ = self.encode(image)
            options = _grpc_options(conf, iou, classes, max_det)
            reply = self._grpc.call("Segment", pb().SegmentRequest(image=data, options=options))
            return self._grpc.segmentation(reply)
        params = _detect_params(conf, iou, classes, max_det)
        response = self._send(self._single("/v1/segment", image, params))
        return Segmentation.from_json(response.json())

    def products(
        self,
        image: ImageInput,
        *,
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[int] | None = None,
        max_det: int | None = None,
        margin: float | None = None,
        **cutout: Any,
    ) -> Products:
        self._http_only("products")
        params = {
            **_detect_params(conf, iou, classes, max_det),
            "margin": margin,
            **_cutout_params(**cutout),
        }
        response = self._send(self._single("/v1/products", image, params))
        return Products.from_json(response.json())

    def frames(
        self,
        images: Sequence[ImageInput],
        task: Task = "remove-background",
        *,
        output: Output = "rgba",
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[int] | None = None,
        max_det: int | None = None,
        **cutout: Any,
    ) -> list[FrameResult]:
        """Many frames in one request; results in input order, a bad frame as FrameError.
        ``task="remove-background"`` takes the cutout options of :meth:`remove_background`
        for every frame; ``task="segment"`` the detection options."""
        if self._grpc is not None:
            request = self._grpc.frames_request(
                [self.encode(i)[0] for i in images],
                task,
                output,
                _grpc_options(conf, iou, classes, max_det),
                _grpc_cutout(cutout),
            )
            return [self._grpc.frame(r) for r in self._grpc.call("Frames", request).frames]
        params = {
            "task": task,
            "output": output,
            **_detect_params(conf, iou, classes, max_det),
            **_cutout_params(**cutout),
        }
        return parse_frames(self._send(self._frames(images, params)).json())

    def map(self, fn: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
        """``[fn(item) for item in items]`` with ``max_concurrency`` calls in flight, in order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    def models(self) -> dict[str, Any]:
        self._http_only("models")
        result: dict[str, Any] = self._send(_Request("/v1/models", {}, method="GET")).json()
        return result


class AsyncSegmentorClient(_Base):
    """asyncio client; the same methods as :class:`SegmentorClient`, awaited."""

    def _open(self, limits: httpx.Limits) -> None:
        self._grpc: AsyncGrpcTransport | None = None
        if self.uses_grpc:
            from segmentation_client.grpc_transport import AsyncGrpcTransport

            self._grpc = AsyncGrpcTransport(self)
        self._http = httpx.AsyncClient(
            base_url=self._http_base_url,
            headers=self.headers,
            timeout=self.timeout_s,
            limits=limits,
        )
        _bound_by_call_deadline(self._http)
        self._slots = asyncio.Semaphore(self.max_concurrency)

    async def __aenter__(self) -> AsyncSegmentorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        if self._grpc is not None:
            await self._grpc.close()

    async def _send(self, request: _Request) -> httpx.Response:
        started = time.monotonic()
        deadline = started + self.timeout_s
        token = _CALL_DEADLINE.set(deadline)
        try:
            attempt = 0
            while True:
                attempt += 1
                response: httpx.Response | None = None
                failure: httpx.TransportError | None = None
                try:
                    async with asyncio.timeout(self._remaining(request, deadline)):
                        await self._slots.acquire()
                except TimeoutError:
                    raise self._busy(request) from None
                try:
                    kwargs = self._attempt(request, deadline)
                    response = await self._http.request(request.method, request.path, **kwargs)
                except httpx.TransportError as exc:
                    failure = exc
                finally:
                    self._slots.release()
                wait = self._next_wait(attempt, response, started, deadline)
                if wait < 0:
                    return self._outcome(request, response, failure, deadline)
                self.retries += 1
                await asyncio.sleep(wait)
        finally:
            _CALL_DEADLINE.reset(token)

    async def _encoded(self, build: Callable[[], _Request]) -> _Request:
        # Encoding a 1080p frame takes milliseconds: keep it off the event loop.
        return await asyncio.to_thread(build)

    async def remove_background(
        self, image: ImageInput, output: Output = "rgba", **cutout: Any
    ) -> Image:
        params = _clean(_cutout_params(**cutout))
        if self._grpc is not None:
            data, _ = await asyncio.to_thread(self.encode, image)
            message = pb().ImageRequest(
                image=data, output=self._grpc_output(output), cutout=_grpc_cutout(cutout)
            )
            return self._grpc.image(await self._grpc.call("RemoveBackground", message))
        request = await self._encoded(
            lambda: self._single("/v1/remove-background", image, {"output": output, **params})
        )
        response = await self._send(request)
        return _image(response)

    async def segment(
        self,
        image: ImageInput,
        *,
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[int] | None = None,
        max_det: int | None = None,
    ) -> Segmentation:
        if self._grpc is not None:
            data, _ = await asyncio.to_thread(self.encode, image)
            options = _grpc_options(conf, iou, classes, max_det)
            message = pb().SegmentRequest(image=data, options=options)
            return self._grpc.segmentation(await self._grpc.call("Segment", message))
        params = _detect_params(conf, iou, classes, max_det)
        request = await self._encoded(lambda: self._single("/v1/segment", image, params))
        return Segmentation.from_json((await self._send(request)).json())

    async def products(
        self,
        image: ImageInput,
        *,
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[int] | None = None,
        max_det: int | None = None,
        margin: float | None = None,
        **cutout: Any,
    ) -> Products:
        self._http_only("products")
        params = {
            **_detect_params(conf, iou, classes, max_det),
            "margin": margin,
            **_cutout_params(**cutout),
        }
        request = await self._encoded(lambda: self._single("/v1/products", image, params))
        return Products.from_json((await self._send(request)).json())

    async def frames(
        self,
        images: Sequence[ImageInput],
        task: Task = "remove-background",
        *,
        output: Output = "rgba",
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[int] | None = None,
        max_det: int | None = None,
        **cutout: Any,
    ) -> list[FrameResult]:
        if self._grpc is not None:
            data = await asyncio.to_thread(lambda: [self.encode(i)[0] for i in images])
            options = _grpc_options(conf, iou, classes, max_det)
            message = self._grpc.frames_request(data, task, output, options, _grpc_cutout(cutout))
            reply = await self._grpc.call("Frames", message)
            return [self._grpc.frame(r) for r in reply.frames]
        params = {
            "task": task,
            "output": output,
            **_detect_params(conf, iou, classes, max_det),
            **_cutout_params(**cutout),
        }
        request = await self._encoded(lambda: self._frames(images, params))
        return parse_frames((await self._send(request)).json())

    async def models(self) -> dict[str, Any]:
        self._http_only("models")
        response = await self._send(_Request("/v1/models", {}, method="GET"))
        result: dict[str, Any] = response.json()
        return result
