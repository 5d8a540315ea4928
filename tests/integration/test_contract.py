"""The running demo application against its own OpenAPI document (Schemathesis).

Every operation is called with generated requests (valid and invalid parameters, headers,
bodies, wrong methods) and each answer is checked: no 5xx, a documented status, content type
and headers, a body that matches the published schema, invalid input refused, 405 naming the
allowed methods.

One check is left out: ``positive_data_acceptance`` (a request that matches the schema must
be accepted). The schema can only say an image body is a binary string; arbitrary bytes that
match it are not a decodable image, and the service answers them 400, as it should. Raw image
bodies are drawn from real images instead (``media_type`` below), so the 200 answers are
exercised and checked against their schemas; multipart and octet-stream bodies stay
arbitrary bytes and exercise the 400 and per-frame error paths.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

_FRAMES = [product_frame(96, 64, seed=300 + i) for i in range(3)]
for _media, _format in (
    ("image/png", "PNG"),
    ("image/jpeg", "JPEG"),
    ("image/webp", "WEBP"),
    ("image/bmp", "BMP"),
    ("image/tiff", "TIFF"),
):
    schemathesis.openapi.media_type(
        _media, st.sampled_from([encode(frame, _format) for frame in _FRAMES])
    )


#: Examples per operation and generation mode. A few minutes on two CPU cores with
#: authentication off and on.
EXAMPLES = 15
KEY = "contract-key"


def _check_contract(url: str, headers: dict[str, str] | None = None) -> None:
    """Each operation, valid then invalid requests, a fixed seed and a bounded number of
    examples, every answer checked against the schema the running service publishes."""
    # 504 is the documented answer to a deadline the client chose too short (generated
    # X-Request-Timeout-Ms values of a few ms), not a server fault.
    config = SchemathesisConfig.from_dict(
        {"checks": {"not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", "504"]}}}
    )
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=config, timeout=60, headers=headers or {}
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:
        raw = operation.definition.raw
        takes_input = bool(raw.get("parameters") or raw.get("requestBody"))
        # An operation without parameters or body (GET /healthz) has no invalid request.
        modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * takes_input
        for mode in modes:

            @seed(20261125)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                case.call_and_validate(
                    base_url=url,
                    headers=headers,
                    timeout=120,
                    excluded_checks=[positive_data_acceptance],
                )

            check()


def test_every_answer_matches_the_published_contract(cluster: Cluster) -> None:
    _check_contract(cluster.url)


def test_the_contract_holds_with_authentication_on(cluster: Cluster) -> None:
    """The same with ``router.api_key_env`` set: the key opens every operation (and the
    schema itself), and the operations still answer as they say."""
    config = cluster.app_config()
    app = config["applications"][0]
    secured = {
        **app,
        "name": "contract-secured",
        "route_prefix": "/contract-secured",
        "runtime_env": {"env_vars": {**app["runtime_env"]["env_vars"], "CONTRACT_KEY": KEY}},
        "args": {**app["args"], "router": {**app["args"]["router"], "api_key_env": "CONTRACT_KEY"}},
    }
    config["applications"] = [app, secured]
    cluster.deploy(config, "contract-secured.yaml")
    url = f"{cluster.url}/contract-secured"
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        cluster.wait_ready_at(url, headers=headers)
        _check_contract(url, headers)
    finally:
        cluster.deploy(cluster.app_config(), "restore.yaml")
