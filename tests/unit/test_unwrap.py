"""Errors raised through Ray handles become the typed errors the router answers with."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from segmentation.errors import InvalidImageError, OverloadedError
from segmentation_service.errors import error_response, unwrap


@pytest.mark.parametrize(
    "lost",
    [
        ActorDiedError(),
        ActorUnavailableError("connection lost", None),
        RayActorError(),
        ReplicaUnavailableError("RMBGDeployment#abc"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_replica_lost_mid_request_is_a_retryable_503(lost: BaseException) -> None:
    error = unwrap(lost)
    assert isinstance(error, OverloadedError)
    assert error.retry_after_s == 2
    response = error_response(lost)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert b'"code":"overloaded"' in response.body
    assert b"restarted" in response.body


def test_a_full_queue_is_a_503_retryable_after_one_second() -> None:
    response = error_response(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


def test_a_replica_error_is_taken_out_of_its_ray_wrapper() -> None:
    cause = InvalidImageError("truncated JPEG")
    wrapped = RayTaskError("batched", "traceback", cause)
    error = unwrap(wrapped)
    assert isinstance(error, InvalidImageError) and error.message == "truncated JPEG"
    assert error_response(wrapped).status_code == 400


def test_an_unknown_error_stays_a_500_without_retry_after() -> None:
    response = error_response(ValueError("bug"))
    assert response.status_code == 500 and "Retry-After" not in response.headers


def test_a_deployment_that_failed_to_deploy_is_a_503_not_a_500() -> None:
    from ray.serve.exceptions import DeploymentUnavailableError

    response = error_response(DeploymentUnavailableError("RMBGDeployment is DEPLOY_FAILED"))
    assert response.status_code == 503 and response.headers["Retry-After"] == "10"
    assert b"DEPLOY_FAILED" in response.body


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1", True),
        ("86400000", True),
        ("0", False),
        ("86400001", False),
        ("9" * 400, False),
        ("12a", False),
        ("\u0661\u0662", False),
        (" 50 ", True),
    ],
)
def test_client_timeouts_are_whole_milliseconds_within_a_day(value: str, ok: bool) -> None:
    from segmentation.errors import InvalidRequestError
    from segmentation_service.deadlines import parse_timeout_ms

    if ok:
        assert parse_timeout_ms(value) == int(value)
    else:
        with pytest.raises(InvalidRequestError, match="x-request-timeout-ms"):
            parse_timeout_ms(value)


def test_api_keys_compare_as_bytes_and_fail_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from segmentation_service.auth import MissingApiKeyError, key_matches, load_api_key

    assert key_matches("s3cret", "s3cret") and not key_matches("\u00e9t\u00e9", "s3cret")
    assert not key_matches("\udcff", "s3cret")  # a lone surrogate, as a bad decode gives
    assert load_api_key(None) is None
    monkeypatch.delenv("PS_TEST_KEY", raising=False)
    with pytest.raises(MissingApiKeyError, match="PS_TEST_KEY is not set"):
        load_api_key("PS_TEST_KEY")
    monkeypatch.setenv("PS_TEST_KEY", " ")
    with pytest.raises(MissingApiKeyError, match="PS_TEST_KEY is empty"):
        load_api_key("PS_TEST_KEY")
    monkeypatch.setenv("PS_TEST_KEY", "k")
    assert load_api_key("PS_TEST_KEY") == "k"
