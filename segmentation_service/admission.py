"""Admission control in the router: a bounded number of frames in flight per replica."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from segmentation.errors import OverloadedError, PayloadTooLargeError


class FrameBudget:
    """At most ``limit`` frames in flight in one router replica; past it, 503 + Retry-After.

    What the budget counts: every frame a request has at a model at once, held from admission
    until the answer is sent. A single-image request (``/v1/remove-background``,
    ``/v1/segment``) holds 1; ``/v1/frames`` holds one per frame it carries; ``/v1/products``
    holds 1 for the detection and then 1 more per detected object, whose cutouts it fans out
    to RMBG-2.0 at once.

    Used from one event loop, so the counter needs no lock. Refusing early, before any model
    work, keeps queues bounded: overload becomes 503 + Retry-After, never a growing backlog or
    an OOM. A request that needs more than ``limit`` frames could never be admitted, so it is
    413, not a 503 that would be retried forever.
    """

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.rejected = 0

    @contextmanager
    def admit(self, frames: int = 1, *, held: int = 0, too_large: str = "") -> Iterator[None]:
        """Hold ``frames`` more frames for the block. ``held``: frames this same request
        already holds (they count against the limit once). ``too_large``: what the caller
        can change when the request can never fit; it ends the 413's message."""
        if held + frames > self.limit:
            raise PayloadTooLargeError(
                f"this request needs {held + frames} frames in flight at once; a router replica "
                f"holds at most max_inflight_frames={self.limit}"
                + (f": {too_large}" if too_large else "")
            )
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
