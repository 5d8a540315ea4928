"""Request deadlines in the router: every wait is bounded, expiry is a 504."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from segmentation.errors import DeadlineExceededError, SegmentationError
from segmentation_service.deadlines import Deadline
from segmentation_service.errors import http_status


async def _never() -> None:
    await asyncio.Event().wait()  # a replica that never answers


def test_a_deadline_counts_from_the_arrival_not_from_when_it_is_checked() -> None:
    arrived = time.time() - 0.5  # the body took half a second to read
    with pytest.raises(DeadlineExceededError) as info:
        Deadline.after(arrived, timeout_ms=400).remaining()
    assert http_status(info.value) == 504
    left = Deadline.after(arrived, timeout_ms=60_000).remaining()
    assert left is not None and 57.0 < left < 59.6
    assert Deadline.after(arrived, None).remaining() is None


def test_a_stuck_call_ends_at_the_deadline_and_is_cancelled() -> None:
    cancelled: list[bool] = []

    async def run() -> None:
        deadline = Deadline.after(time.time(), timeout_ms=50)
        await deadline.bound(_never(), cap_s=60, on_timeout=lambda: cancelled.append(True))

    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        asyncio.run(run())
    assert time.monotonic() - started < 5
    assert "X-Request-Timeout-Ms" in info.value.message
    assert cancelled == [True]


def test_without_a_deadline_the_configured_maximum_bounds_a_stuck_call() -> None:
    async def run() -> None:
        await Deadline(None).bound(_never(), cap_s=0.05)

    with pytest.raises(DeadlineExceededError) as info:
        asyncio.run(run())
    assert "model_call_timeout_s" in info.value.message


def test_a_call_within_its_deadline_returns_its_answer() -> None:
    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 7

    async def run() -> int:
        return await Deadline.after(time.time(), timeout_ms=10_000).bound(answer(), cap_s=5)

    assert asyncio.run(run()) == 7


def _router_read(timeout_ms: int | None, body_timeout_s: float) -> SegmentationError:
    """What the Router's body read of an upload that never finishes ends with (the Router
    with only its settings: the read uses nothing else)."""
    from segmentation_service.router import Router

    read_body = cast(Any, Router).func_or_class._read_body
    router = SimpleNamespace(args=SimpleNamespace(body_timeout_s=body_timeout_s))

    async def run() -> None:
        await read_body(router, _never(), Deadline.after(time.time(), timeout_ms))

    with pytest.raises(SegmentationError) as info:
        asyncio.run(run())
    return info.value


def test_the_routers_body_read_answers_504_for_the_deadline_and_408_for_its_limit() -> None:
    deadline = _router_read(timeout_ms=30, body_timeout_s=30)
    assert http_status(deadline) == 504
    assert "X-Request-Timeout-Ms" in str(deadline)
    limit = _router_read(timeout_ms=None, body_timeout_s=0.03)
    assert http_status(limit) == 408
    assert "within 0.03 s (router.body_timeout_s)" in str(limit)
    # A deadline further off than the limit: the limit's 408.
    assert http_status(_router_read(timeout_ms=30_000, body_timeout_s=0.03)) == 408


def test_an_upload_cut_by_the_request_deadline_is_a_504_even_at_the_clock_boundary() -> None:
    # Which limit ran out follows from the limits, not from the wall clock read again after
    # the wait: a tiny deadline is a 504 every time, never the body limit's 408.
    statuses = {http_status(_router_read(timeout_ms=20, body_timeout_s=30)) for _ in range(50)}
    assert statuses == {504}
