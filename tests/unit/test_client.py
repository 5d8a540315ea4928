"""The client's own logic: Retry-After, backoff, answer parsing, input encoding."""

from __future__ import annotations

import email.utils
import io
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from segmentation.encoders import b64, encode_rle, rgba_png
from segmentation_client.client import (
    FrameError,
    Image,
    RetryPolicy,
    Segmentation,
    SegmentorClient,
    ServiceError,
    ServiceTimeout,
    ServiceUnreachable,
    parse_frames,
    parse_retry_after,
    sniff_content_type,
)
from tests.conftest import assert_cutout, encode, product_frame


def test_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (parse_retry_after(soon) or 0) <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert parse_retry_after(past) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_retry_waits_honour_the_header_with_jitter_and_a_ceiling() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_wait_s=10)
    for _ in range(50):
        assert 2.0 <= policy.wait(1, "2") <= 3.0
        assert 0.5 <= policy.wait(1, None) <= 1.0  # backoff, then doubling
        assert 2.0 <= policy.wait(3, None) <= 3.0
        assert policy.wait(1, "120") == 10


def test_typed_answers_parse_from_the_service_json() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 3:9] = 1
    second = np.zeros_like(mask)
    second[12:15, 20:25] = 1
    instance = {"score": 0.9, "class_id": 39, "class_name": "bottle"}
    answer = {
        "task": "segment",
        "frames": [
            {
                "index": 0,
                "width": 30,
                "height": 20,
                "model": "m",
                "instances": [
                    {**instance, "box": [3, 5, 9, 10], "mask": encode_rle(mask)},
                    {**instance, "box": [20, 12, 25, 15], "mask": encode_rle(second)},
                ],
            },
            {"index": 1, "error": {"code": "invalid_image", "message": "not an image"}},
        ],
    }
    found, failed = parse_frames(answer)
    assert isinstance(found, Segmentation) and found.instances[0].class_name == "bottle"
    assert np.array_equal(found.instances[0].mask(), mask)
    assert np.array_equal(found.union_mask(), (mask | second) * 255)
    assert failed == FrameError(1, "invalid_image", "not an image")

    frame = product_frame(30, 20)
    alpha = np.full((20, 30), 128, np.uint8)
    cutouts = parse_frames(
        {
            "task": "remove-background",
            "frames": [{"index": 0, "image": b64(rgba_png(frame, alpha))}],
        }
    )
    assert isinstance(cutouts[0], Image)
    assert_cutout(cutouts[0].to_array(), frame)
    assert np.array_equal(cutouts[0].alpha(), alpha)


def test_inputs_are_encoded_by_type(tmp_path) -> None:
    client = SegmentorClient("http://localhost:1", frame_format="png")
    frame = product_frame(16, 8)
    data, content_type = client.encode(frame)
    assert content_type == "image/png"
    assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(data))), frame)  # lossless
    jpeg = encode(frame)
    (tmp_path / "f.jpg").write_bytes(jpeg)
    assert client.encode(tmp_path / "f.jpg") == (jpeg, "image/jpeg")
    assert client.encode(jpeg) == (jpeg, "image/jpeg")
    assert sniff_content_type(b"RIFF0000WEBPVP8 ") == "image/webp"
    assert sniff_content_type(b"GIF89a") == "application/octet-stream"
    client.close()
    with pytest.raises(ValueError):
        SegmentorClient("http://localhost:1", max_concurrency=0)


# -- overall deadline and the gRPC transport, against local fakes (faults only) ----------------
def _http_client(handler, timeout_s: float):  # type: ignore[no-untyped-def]
    import httpx

    from segmentation_client.client import SegmentorClient

    client = SegmentorClient("http://segmentor.test", timeout_s=timeout_s)
    client._http = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(handler))
    return client


def test_the_timeout_bounds_all_retries_and_is_sent_as_the_remaining_time() -> None:
    import httpx

    sent: list[int] = []

    def overloaded(request: httpx.Request) -> httpx.Response:
        sent.append(int(request.headers["X-Request-Timeout-Ms"]))
        return httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {}})

    client = _http_client(overloaded, timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(ServiceError) as error:
        client.remove_background(b"\x89PNG")
    assert error.value.status == 503
    # Bounded by the deadline, not by ten retries of a second each (slack for a busy machine).
    assert time.monotonic() - started < 3.0
    # One wait of at least a second fits in 1.5 s at most once: two tries, not ten.
    assert 1 <= len(sent) <= 2 and sent[0] <= 1500
    assert sent == sorted(sent, reverse=True)


def test_read_timeouts_are_not_retried_past_the_overall_deadline() -> None:
    import httpx

    attempts: list[tuple[float, int]] = []

    def slow(request: httpx.Request) -> httpx.Response:
        attempts.append((time.monotonic(), int(request.headers["X-Request-Timeout-Ms"])))
        time.sleep(0.15)
        raise httpx.ReadTimeout("no answer", request=request)

    client = _http_client(slow, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceTimeout) as error:
        client.remove_background(b"\x89PNG")
    ended = time.monotonic() - started
    assert (error.value.status, error.value.code) == (504, "deadline_exceeded")
    assert isinstance(error.value.__cause__, httpx.ReadTimeout)
    # Every attempt starts before the overall deadline (0.25 s for a busy machine to reach the
    # handler: a third try, the first that could start late, would come at 0.9 s at the
    # earliest), each told less than the 0.5 s, and the retry budget (9 tries without a
    # deadline) is cut short by it: at most 0.5 s / 0.15 s per try.
    assert attempts and all(at - started < 0.5 + 0.25 for at, _ in attempts)
    assert all(0 < left_ms <= 500 for _, left_ms in attempts)
    assert len(attempts) <= 4
    assert ended < 0.5 + 1.0


def test_a_connection_failure_whose_retry_would_pass_the_deadline_raises_that_failure() -> None:
    """The retry decision is taken once per attempt: a jittered wait drawn twice used to
    pass the first check and fail the second, ending the loop with no answer at all."""
    import httpx

    from segmentation_client.client import RetryPolicy

    drawn: list[float] = []

    class ShortThenLong(RetryPolicy):
        def wait(self, attempt: int, retry_after: str | None) -> float:
            # Like jitter, each draw differs: the second one ends past the deadline.
            drawn.append(0.0 if not drawn else 60.0)
            return drawn[-1]

    tries = 0

    def unreachable(request: httpx.Request) -> httpx.Response:
        nonlocal tries
        tries += 1
        raise httpx.ConnectError("connection refused", request=request)

    client = _http_client(unreachable, timeout_s=5.0)
    client.retry = ShortThenLong()
    with pytest.raises(ServiceUnreachable, match="connection refused") as error:
        client.remove_background(b"\x89PNG")
    assert isinstance(error.value.__cause__, httpx.ConnectError)
    assert tries == 2


class _FakeSegmentor:
    """A gRPC servicer that is overloaded ``overloaded`` times, then answers."""

    Segment = Frames = StreamFrames = None  # not called by these tests

    def __init__(self, overloaded: int) -> None:
        self.overloaded = overloaded
        self.retry_after = "0"
        self.metadata: list[dict[str, str]] = []

    def RemoveBackground(self, request, context):  # type: ignore[no-untyped-def]
        import grpc

        from segmentation_client.proto import segmentor_pb2 as pb

        self.metadata.append(dict(context.invocation_metadata()))
        if request.image == b"junk":
            context.set_trailing_metadata((("error-code", "invalid_image"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not an image")
        if self.overloaded > 0:
            self.overloaded -= 1
            context.set_trailing_metadata(
                (("retry-after", self.retry_after), ("error-code", "overloaded"))
            )
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        png = encode(np.full((2, 3), 200, np.uint8), "PNG")
        return pb.ImageReply(format=pb.MATTE_PNG, data=png, width=3, height=2)


@pytest.fixture
def fake_grpc():  # type: ignore[no-untyped-def]
    pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from segmentation_client.proto.segmentor_pb2_grpc import add_SegmentorServicer_to_server

    servicer = _FakeSegmentor(overloaded=2)
    server = grpc.server(ThreadPoolExecutor(2))
    add_SegmentorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"grpc://127.0.0.1:{port}"
    server.stop(0)


def test_grpc_client_retries_resource_exhausted_with_a_retry_delay(fake_grpc) -> None:  # type: ignore[no-untyped-def]
    from segmentation_client.client import SegmentorClient

    servicer, url = fake_grpc
    with SegmentorClient(url, api_key="k", timeout_s=30) as client:
        matte = client.remove_background(b"\x89PNG", output="mask")
        assert client.retries == 2
        with pytest.raises(ServiceError) as error:
            client.remove_background(b"junk")
    assert matte.alpha().tolist() == [[200, 200, 200], [200, 200, 200]]
    assert (error.value.status, error.value.code) == ("INVALID_ARGUMENT", "invalid_image")
    first = servicer.metadata[0]
    assert first["authorization"] == "Bearer k"
    assert 0 < int(first["x-request-timeout-ms"]) <= 30000


def test_async_grpc_client_gives_up_at_its_deadline(fake_grpc) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from segmentation_client.client import AsyncSegmentorClient, RetryPolicy

    servicer, url = fake_grpc
    servicer.overloaded, servicer.retry_after = 1000, "1"

    async def run() -> None:
        retry = RetryPolicy(backoff_s=0.2)
        async with AsyncSegmentorClient(url, timeout_s=1.0, retry=retry) as client:
            await client.remove_background(b"\x89PNG")

    started = time.monotonic()
    with pytest.raises(ServiceError) as error:
        asyncio.run(run())
    assert error.value.status == "RESOURCE_EXHAUSTED"
    # Waiting the asked second would end past the 1 s deadline: no second try (and no
    # thousand: the bound leaves slack for a busy machine).
    assert time.monotonic() - started < 2.5
    assert len(servicer.metadata) == 1
