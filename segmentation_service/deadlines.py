"""Request deadlines in the router: taken when a request arrives, enforced at every wait.

A client's ``X-Request-Timeout-Ms`` counts from the moment the router sees the request, not
from when its body has been read and decoded (a slow upload or a busy codec pool spends the
client's time too). Every wait after that (reading the body, decoding, each model call) is
bounded by what is left, and model calls also by a configured maximum, so a stuck replica
cannot hold a request forever. An expired deadline answers 504 wherever it expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from segmentation.errors import DeadlineExceededError, InvalidRequestError

T = TypeVar("T")
#: Longest request timeout a client may ask for (one day), in milliseconds: a bound that keeps
#: every deadline a finite wall-clock time (a 400-digit value overflowed a float).
MAX_TIMEOUT_MS = 86_400_000


def parse_timeout_ms(value: str | None, name: str = "x-request-timeout-ms") -> int | None:
    """A client's timeout in milliseconds out of header or metadata text; 422 unless it is an
    integer from 1 to :data:`MAX_TIMEOUT_MS`."""
    if value is None:
        return None
    text = value.strip()
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > 9
        or not 1 <= int(text) <= MAX_TIMEOUT_MS
    ):
        raise InvalidRequestError(
            f"{name}={value[:40]!r}: expected an integer from 1 to {MAX_TIMEOUT_MS} (milliseconds)"
        )
    return int(text)


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered by (wall-clock seconds, as replicas compare it), or
    ``None`` when the client set no limit."""

    at: float | None

    @classmethod
    def after(cls, arrived: float, timeout_ms: int | None) -> Deadline:
        return cls(None if timeout_ms is None else arrived + timeout_ms / 1000.0)

    @classmethod
    def of_request(cls, arrived: float | None, timeout_ms: int | None) -> Deadline:
        """A request's deadline counted from its arrival (now when it was not stamped); 504
        at once if it already passed."""
        deadline = cls.after(arrived or time.time(), timeout_ms)
        deadline.remaining()
        return deadline

    def remaining(self) -> float | None:
        """Seconds left (``None``: unbounded); raises 504 when none are."""
        if self.at is None:
            return None
        left = self.at - time.time()
        if left <= 0:
            raise DeadlineExceededError("the request deadline (X-Request-Timeout-Ms) passed")
        return left

    async def bound(
        self,
        awaitable: Awaitable[T],
        cap_s: float | None = None,
        on_timeout: Callable[[], object] | None = None,
        capped: Callable[[], Exception] | None = None,
    ) -> T:
        """``awaitable``'s result, waiting at most the time left and at most ``cap_s``;
        ``on_timeout`` (e.g. cancelling a replica call) runs when either runs out. Which one
        ran out is the smaller of the two, not the clock read again after the wait: the
        deadline's 504, or ``capped()`` (default: a 504 naming the model call's limit) for
        ``cap_s``."""
        try:
            left = self.remaining()
        except DeadlineExceededError:
            discard(awaitable)
            raise
        limits = [t for t in (left, cap_s) if t is not None]
        timeout = min(limits) if limits else None
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            if on_timeout is not None:
                on_timeout()
            if left is not None and timeout == left:
                raise DeadlineExceededError(
                    "the request deadline (X-Request-Timeout-Ms) passed"
                ) from None
            if capped is not None:
                raise capped() from None
            raise DeadlineExceededError(
                f"no answer from the model within {cap_s or 0:g} s (router model_call_timeout_s)"
            ) from None


def as_deadline(deadline: Deadline | float | None) -> Deadline:
    """``deadline`` as a :class:`Deadline`; a float is a wall-clock time, as replicas take."""
    return deadline if isinstance(deadline, Deadline) else Deadline(deadline)


def discard(awaitable: Awaitable[object]) -> None:
    """Close a coroutine that will not be awaited (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if asyncio.iscoroutine(awaitable) and close is not None:
        close()
