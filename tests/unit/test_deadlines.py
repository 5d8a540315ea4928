"""Request deadlines in the router: every wait is bounded, expiry is a 504."""

from __future__ import annotations

import asyncio
import time

import pytest

from segmentation.errors import DeadlineExceededError
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
