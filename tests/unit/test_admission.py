import pytest
from pydantic import ValidationError

from segmentation.errors import OverloadedError, PayloadTooLargeError
from segmentation_service.admission import FrameBudget
from segmentation_service.config import RouterArgs
from segmentation_service.errors import http_status


def test_admits_up_to_the_limit_then_refuses_with_retry_after() -> None:
    budget = FrameBudget(limit=3, retry_after_s=2)
    with budget.admit(2), budget.admit(1):
        assert budget.in_flight == 3
        with pytest.raises(OverloadedError) as info, budget.admit(1):
            pass
        assert http_status(info.value) == 503 and info.value.retry_after_s == 2
        assert "limit 3" in info.value.message
    assert budget.in_flight == 0 and budget.rejected == 1


def test_frames_are_released_when_the_request_fails() -> None:
    budget = FrameBudget(limit=4)
    with pytest.raises(RuntimeError), budget.admit(4):
        raise RuntimeError("model failed")
    assert budget.in_flight == 0
    with budget.admit(4):
        assert budget.in_flight == 4


def test_a_request_larger_than_the_whole_budget_is_413_naming_both_settings() -> None:
    budget = FrameBudget(limit=8)
    with (
        budget.admit(3),
        pytest.raises(PayloadTooLargeError) as info,
        budget.admit(9, too_large="send at most max_frames_per_request=8"),
    ):
        pass
    assert http_status(info.value) == 413 and info.value.retry_after_s is None
    assert "max_inflight_frames=8" in info.value.message
    assert "max_frames_per_request=8" in info.value.message
    assert budget.in_flight == 0 and budget.rejected == 0  # not an overload: never retryable


def test_frames_a_request_already_holds_count_once_against_the_limit() -> None:
    """/v1/products holds 1 frame for the detection, then 1 per object for the cutouts."""
    budget = FrameBudget(limit=4)
    with budget.admit(1):
        with budget.admit(3, held=1):
            assert budget.in_flight == 4
        with pytest.raises(PayloadTooLargeError), budget.admit(4, held=1):
            pass
        with budget.admit(2), pytest.raises(OverloadedError), budget.admit(2, held=1):
            pass  # fits the budget, not what is free now: 503, retryable
    assert budget.in_flight == 0 and budget.rejected == 1


def test_a_router_whose_largest_request_cannot_be_admitted_is_refused_at_deploy_time() -> None:
    with pytest.raises(ValidationError) as info:
        RouterArgs(max_frames_per_request=256, max_inflight_frames=192)
    message = str(info.value)
    assert "max_frames_per_request=256" in message and "max_inflight_frames=192" in message
    args = RouterArgs(max_frames_per_request=192, max_inflight_frames=192)
    assert args.max_frames_per_request == args.max_inflight_frames == 192


def test_pixels_are_budgeted_per_request_and_per_router() -> None:
    from segmentation.errors import PayloadTooLargeError

    budget = FrameBudget(limit=100, pixel_limit=1000, request_pixel_limit=600)
    with pytest.raises(PayloadTooLargeError, match="max_request_pixels=600"), budget.admit(2, 700):
        pass
    with budget.admit(1, 600), budget.admit(1, 400):
        assert budget.in_flight_pixels == 1000
        with (
            pytest.raises(OverloadedError, match="max_inflight_pixels") as info,
            budget.admit(1, 1),
        ):
            pass
        assert info.value.retry_after_s == 1
    assert budget.in_flight_pixels == 0 and budget.in_flight == 0
    # What a request already holds counts once against the per-request limit.
    with (
        budget.admit(1, 500),
        pytest.raises(PayloadTooLargeError),
        budget.admit(1, 200, held=1, held_pixels=500),
    ):
        pass


def test_body_bytes_are_charged_as_they_arrive_and_given_back() -> None:
    from segmentation_service.admission import ByteBudget

    budget = ByteBudget(limit=100)
    with budget.account() as charge:
        charge(60)
        with budget.account() as other:
            with pytest.raises(OverloadedError, match="max_inflight_body_bytes=100"):
                other(41)
            other(40)
            assert budget.held == 100
        assert budget.held == 60
    assert budget.held == 0 and budget.rejected == 1


def test_a_body_larger_than_the_whole_byte_budget_is_413_not_a_503_forever() -> None:
    from segmentation_service.admission import ByteBudget

    budget = ByteBudget(limit=100)
    with budget.account() as charge, pytest.raises(PayloadTooLargeError, match="count twice"):
        charge(60)
        charge(60)  # the parsed copy of a multipart body
    assert budget.held == 0 and budget.rejected == 0
