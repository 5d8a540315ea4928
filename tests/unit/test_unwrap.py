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
