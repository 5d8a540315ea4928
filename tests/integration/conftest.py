"""One real Ray cluster and one Serve application (configs/demo.yaml) per test session.

The application is started the way users start it, ``ray start`` and ``serve deploy`` of the
demo config (stand-in models on the CPU), with only the HTTP port and body limit changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.serve_cluster import Cluster, running_cluster

MAX_BODY = 4 * 1024 * 1024
#: Seconds a request's body may take to arrive (the service's default is 30).
BODY_TIMEOUT_S = 3.0
#: Serve's gRPC proxy takes messages up to this size (``ray start`` environment): the body
#: limit and room for the rest of the message, as docs/operations.md says to set it.
GRPC_MAX_MESSAGE = MAX_BODY + 64 * 1024


def _limit_body(config: dict[str, Any]) -> None:
    router = config["applications"][0]["args"]["router"]
    router["max_body_bytes"] = MAX_BODY
    router["body_timeout_s"] = BODY_TIMEOUT_S


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, standin_cache: Path) -> Iterator[Cluster]:
    with running_cluster(
        REPO_ROOT / "configs" / "demo.yaml",
        tmp_path_factory.mktemp("serve"),
        edit=_limit_body,
        extra_env={
            "PRODUCT_SEGMENTOR_CACHE": str(standin_cache),
            "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE),
        },
    ) as handle:
        yield handle


@pytest.fixture(scope="session")
def client(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        yield http


async def post_masks(url: str, bodies: list[bytes], connections: int = 64) -> list[httpx.Response]:
    """``bodies`` (PNG frames) sent to ``/v1/remove-background?output=mask`` all at once."""
    async with httpx.AsyncClient(
        timeout=120, limits=httpx.Limits(max_connections=connections)
    ) as http:
        return await asyncio.gather(
            *(
                http.post(
                    f"{url}/v1/remove-background",
                    params={"output": "mask"},
                    content=body,
                    headers={"Content-Type": "image/png"},
                )
                for body in bodies
            )
        )
