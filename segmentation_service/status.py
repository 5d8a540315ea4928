"""What the Serve controller knows about the running application."""

from __future__ import annotations

import asyncio
import time

from ray import serve


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment name; empty when the controller cannot be asked.
    A synchronous call to the controller: never on an event loop (see :class:`ReplicaCounts`)."""
    try:
        status = serve.status()
    except Exception:
        return {}
    counts: dict[str, int] = {}
    for application in status.applications.values():
        for name, deployment in application.deployments.items():
            counts[name] = deployment.replica_states.get("RUNNING", 0)
    return counts


class ReplicaCounts:
    """:func:`replica_counts` asked off the event loop, at most once per ``ttl_s``: a router
    answering ``/v1/models`` must not stall every request it holds on a controller call, and
    many ``/v1/models`` calls at once make one controller call."""

    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._value: dict[str, int] = {}
        self._at = float("-inf")
        self._pending: asyncio.Task[dict[str, int]] | None = None

    async def get(self) -> dict[str, int]:
        if time.monotonic() - self._at < self.ttl_s:
            return self._value
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(asyncio.to_thread(replica_counts))
        value = await asyncio.shield(self._pending)
        self._value, self._at = value, time.monotonic()
        return value
