"""Admission control in the router: a bounded number of frames in flight per replica."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from segmentation.errors import OverloadedError


class FrameBudget:
    """At most ``limit`` frames in flight; past it, requests are refused with 503.

    Used from one event loop, so the counter needs no lock. Refusing early, before any
    model work, keeps queues bounded: overload becomes 503 + Retry-After, never a growing
    backlog or an OOM.
    """

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.rejected = 0

    @contextmanager
    def admit(self, frames: int = 1) -> Iterator[None]:
        if self.in_flight + frames > self.limit:
            self.rejected += 1
            raise OverloadedError(
                f"overloaded: {self.in_flight} frames in flight, limit {self.limit}; "
                f"retry after {self.retry_after_s} s",
                self.retry_after_s,
            )
        self.in_flight += frames
        try:
            yield
        finally:
            self.in_flight -= frames
