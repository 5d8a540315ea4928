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
call as a whole, retries and waits included; the service is told the time left
(``X-Request-Timeout-Ms``) so it drops frames nobody waits for any more.

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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

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


class ServiceError(Exception):
    """An error answer of the service (or a request that ran out of retries)."""

    def __init__(self, status: int | str, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """An encoded image answer (PNG): an RGBA cutout or a grayscale matte."""

    data: bytes
    content_type: str = "image/png"

    def to_array(self) -> np.ndarray:
        """Decoded pixels: uint8 ``HxWx4`` for a cutout, ``HxW`` for a matte."""
        with PILImage.open(io.BytesIO(self.data)) as image:
            return np.asarray(image)

    def alpha(self) -> np.ndarray:
        """The uint8 ``HxW`` alpha matte, whether this is a cutout or a matte."""
        pixels = self.to_array()
        return pixels[..., 3] if pixels.ndim == 3 else pixels


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
            products.append(
                Product(
                    box=(x1, y1, x2, y2),
                    score=float(p["score"]),
                    class_id=int(p["class_id"]),
                    class_name=str(p["class_name"]),
                    crop_box=(c1, c2, c3, c4),
                    cutout=Image(_b64decode(p["cutout"])),
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
            results.append(Image(_b64decode(entry["image"]), entry.get("content_type", "")))
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
    return Image(response.content, response.headers.get("content-type", "image/png"))


def _json(response: httpx.Response) -> dict[str, Any]:
    _raise_for_error(response)
    result: dict[str, Any] = response.json()
    return result


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    code, message = "http_error", response.text[:500]
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise ServiceError(response.status_code, code, message)


class _Base:
    """What the sync and async clients share: settings, request building, answer parsing.

    Args:
        base_url: where the service listens, e.g. ``http://localhost:8000``, or
            ``grpc://localhost:9000`` for the gRPC API.
        api_key: sent as ``Authorization: Bearer`` when the service requires one.
        max_concurrency: requests in flight at once from this client.
        retry: retry policy for 503/429 answers and connection failures.
        timeout_s: the longest a call may take, all its retries and waits included.
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
        frame_format: Literal["jpeg", "png"] = "jpeg",
        jpeg_quality: int = 95,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.frame_format = frame_format
        self.jpeg_quality = jpeg_quality
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        #: Answers that asked to retry (503/429) or failed to connect, over the client's life.
        self.retries = 0
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

    def _attempt(self, request: _Request, deadline: float) -> tuple[dict[str, Any], float]:
        """Keyword arguments of one try, with the time left of ``deadline``; raises when
        none is left."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise httpx.TimeoutException(
                f"no answer within the client's timeout of {self.timeout_s} s"
            )
        kwargs = request.send_kwargs()
        ms = str(max(1, int(remaining * 1000)))
        kwargs["headers"] = {**kwargs["headers"], "X-Request-Timeout-Ms": ms}
        kwargs["timeout"] = remaining
        return kwargs, remaining

    def _next_wait(self, attempt: int, response: httpx.Response | None, deadline: float) -> float:
        """Seconds before the next try after this attempt's ``response`` (None: the connection
        failed), or -1 when there is none: the answer is final, the tries are spent, or the
        wait would end past ``deadline``. Decided once per attempt (the wait has jitter)."""
        if response is not None and not _retryable(response):
            return -1.0
        if attempt == self.retry.attempts:
            return -1.0
        return self._wait(attempt, response, deadline)

    def _wait(self, attempt: int, response: httpx.Response | None, deadline: float) -> float:
        """Seconds before the next try, or -1 when it would start past ``deadline``."""
        wait = self.retry.wait(attempt, _retry_after(response))
        return -1.0 if time.monotonic() + wait >= deadline else wait

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


def pb() -> Any:
    """The generated messages, imported on first use (grpc:// clients only)."""
    from segmentation_client.proto import segmentor_pb2

    return segmentor_pb2


def _grpc_options(
    conf: float | None, iou: float | None, classes: Sequence[int] | None, max_det: int | None
) -> Any:
    from segmentation_client.grpc_transport import detect_options

    return detect_options(conf, iou, classes, max_det)


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
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(1, self.retry.attempts + 1):
            response: httpx.Response | None = None
            failure: httpx.TransportError | None = None
            kwargs, _ = self._attempt(request, deadline)
            with self._slots:
                try:
                    response = self._http.post(request.path, **kwargs)
                except httpx.TransportError as exc:
                    failure = exc
            wait = self._next_wait(attempt, response, deadline)
            if wait < 0:
                if failure is not None:
                    raise failure
                break
            self.retries += 1
            time.sleep(wait)
        assert response is not None  # the loop ends with a response, or raises the failure
        _raise_for_error(response)
        return response

    def remove_background(self, image: ImageInput, output: Output = "rgba") -> Image:
        """RGBA cutout (``output="rgba"``) or grayscale matte (``"mask"``) as PNG."""
        if self._grpc is not None:
            data, _ = self.encode(image)
            request = pb().ImageRequest(image=data, output=self._grpc_output(output))
            return self._grpc.image(self._grpc.call("RemoveBackground", request))
        response = self._send(self._single("/v1/remove-background", image, {"output": output}))
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
    ) -> Products:
        self._http_only("products")
        params = {**_detect_params(conf, iou, classes, max_det), "margin": margin}
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
    ) -> list[FrameResult]:
        """Many frames in one request; results in input order, a bad frame as FrameError."""
        if self._grpc is not None:
            request = self._grpc.frames_request(
                [self.encode(i)[0] for i in images],
                task,
                output,
                _grpc_options(conf, iou, classes, max_det),
            )
            return [self._grpc.frame(r) for r in self._grpc.call("Frames", request).frames]
        params = {"task": task, "output": output, **_detect_params(conf, iou, classes, max_det)}
        return parse_frames(self._send(self._frames(images, params)).json())

    def map(self, fn: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
        """``[fn(item) for item in items]`` with ``max_concurrency`` calls in flight, in order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    def models(self) -> dict[str, Any]:
        self._http_only("models")
        return _json(self._http.get("/v1/models"))


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
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(1, self.retry.attempts + 1):
            response: httpx.Response | None = None
            failure: httpx.TransportError | None = None
            kwargs, _ = self._attempt(request, deadline)
            async with self._slots:
                try:
                    response = await self._http.post(request.path, **kwargs)
                except httpx.TransportError as exc:
                    failure = exc
            wait = self._next_wait(attempt, response, deadline)
            if wait < 0:
                if failure is not None:
                    raise failure
                break
            self.retries += 1
            await asyncio.sleep(wait)
        assert response is not None  # the loop ends with a response, or raises the failure
        _raise_for_error(response)
        return response

    async def _encoded(self, build: Callable[[], _Request]) -> _Request:
        # Encoding a 1080p frame takes milliseconds: keep it off the event loop.
        return await asyncio.to_thread(build)

    async def remove_background(self, image: ImageInput, output: Output = "rgba") -> Image:
        if self._grpc is not None:
            data, _ = await asyncio.to_thread(self.encode, image)
            message = pb().ImageRequest(image=data, output=self._grpc_output(output))
            return self._grpc.image(await self._grpc.call("RemoveBackground", message))
        request = await self._encoded(
            lambda: self._single("/v1/remove-background", image, {"output": output})
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
    ) -> Products:
        self._http_only("products")
        params = {**_detect_params(conf, iou, classes, max_det), "margin": margin}
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
    ) -> list[FrameResult]:
        if self._grpc is not None:
            data = await asyncio.to_thread(lambda: [self.encode(i)[0] for i in images])
            options = _grpc_options(conf, iou, classes, max_det)
            message = self._grpc.frames_request(data, task, output, options)
            reply = await self._grpc.call("Frames", message)
            return [self._grpc.frame(r) for r in reply.frames]
        params = {"task": task, "output": output, **_detect_params(conf, iou, classes, max_det)}
        request = await self._encoded(lambda: self._frames(images, params))
        return parse_frames((await self._send(request)).json())

    async def models(self) -> dict[str, Any]:
        self._http_only("models")
        return _json(await self._http.get("/v1/models"))
