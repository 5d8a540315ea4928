"""Admission control in the router: bounded frames, pixels and body bytes per replica.

The router never decodes an image: it reads the body, checks each image's header (format,
width, height) and admits the request by what decoding it will cost next to the model,
before anything is decoded. A request is admitted once its body has been read, so a slow
upload holds no share of the frame budget (only its own bytes, and no longer than
``body_timeout_s``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from segmentation.errors import OverloadedError, PayloadTooLargeError


class FrameBudget:
    """At most ``limit`` frames and ``pixel_limit`` decoded pixels in flight in one router
    replica; past either, 503 + Retry-After.

    What it counts: every frame a request has at a model at once, and the pixels decoding
    them will allocate (from their headers), held from admission until the answer is sent.
    A single-image request (``/v1/remove-background``, ``/v1/segment``) holds 1 frame;
    ``/v1/frames`` holds one per frame it carries; ``/v1/products`` holds 1 for the detection
    and then 1 more per detected object (and its crop's pixels) while the cutouts run.

    Used from one event loop, so the counters need no lock. Refusing early, before any model
    work, keeps queues bounded: overload becomes 503 + Retry-After, never a growing backlog or
    an OOM. A request that needs more than ``limit`` frames or ``request_pixel_limit`` pixels
    could never be admitted, so it is 413, not a 503 that would be retried forever.
    """

    def __init__(
        self,
        limit: int,
        pixel_limit: int | None = None,
        request_pixel_limit: int | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.limit = limit
        self.pixel_limit = pixel_limit
        self.request_pixel_limit = request_pixel_limit or pixel_limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.in_flight_pixels = 0
        self.rejected = 0

    @contextmanager
    def admit(
        self,
        frames: int = 1,
        pixels: int = 0,
        *,
        held: int = 0,
        held_pixels: int = 0,
        too_large: str = "",
    ) -> Iterator[None]:
        """Hold ``frames`` more frames and ``pixels`` more pixels for the block. ``held`` and
        ``held_pixels``: what this same request already holds (counted once against the
        limits). ``too_large``: what the caller can change when the request can never fit;
        it ends the 413's message."""
        hint = f": {too_large}" if too_large else ""
        if held + frames > self.limit:
            raise PayloadTooLargeError(
                f"this request needs {held + frames} frames in flight at once; a router replica "
                f"holds at most max_inflight_frames={self.limit}{hint}"
            )
        wanted = held_pixels + pixels
        if self.request_pixel_limit is not None and wanted > self.request_pixel_limit:
            raise PayloadTooLargeError(
                f"this request needs {wanted} pixels (its images decoded, or their outputs where "
                f"a crop makes them larger); one request may have at most "
                f"max_request_pixels={self.request_pixel_limit}{hint}"
            )
        if self.in_flight + frames > self.limit:
            full = f"{self.in_flight} frames in flight, limit {self.limit} (max_inflight_frames)"
        elif self.pixel_limit is not None and self.in_flight_pixels + pixels > self.pixel_limit:
            full = (
                f"{self.in_flight_pixels} pixels in flight and this request's {pixels}, limit "
                f"{self.pixel_limit} (max_inflight_pixels)"
            )
        else:
            full = ""
        if full:
            self.rejected += 1
            raise OverloadedError(
                f"overloaded: {full}; retry after {self.retry_after_s} s", self.retry_after_s
            )
        self.in_flight += frames
        self.in_flight_pixels += pixels
        try:
            yield
        finally:
            self.in_flight -= frames
            self.in_flight_pixels -= pixels


class ByteBudget:
    """Request body bytes one router replica holds at once, charged as they arrive."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.held = 0
        self.rejected = 0

    @contextmanager
    def account(self) -> Iterator[Callable[[int], None]]:
        """A ``charge(n)`` function for the block: it takes ``n`` more bytes (503 when they do
        not fit); everything charged is given back when the block ends."""
        charged = 0

        def charge(size: int) -> None:
            nonlocal charged
            if charged + size > self.limit:  # this request alone: it could never fit
                raise PayloadTooLargeError(
                    f"this request needs {charged + size} bytes of body buffers (multipart "
                    f"bodies count twice: read, then parsed); a router replica holds at most "
                    f"max_inflight_body_bytes={self.limit}"
                )
            if self.held + size > self.limit:
                self.rejected += 1
                raise OverloadedError(
                    f"overloaded: request bodies of {self.held} bytes are being held, limit "
                    f"max_inflight_body_bytes={self.limit}; retry after {self.retry_after_s} s",
                    self.retry_after_s,
                )
            self.held += size
            charged += size

        try:
            yield charge
        finally:
            self.held -= charged
