import pytest

from segmentation.errors import OverloadedError
from segmentation_service.admission import FrameBudget
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


def test_a_request_larger_than_the_limit_is_refused_whole() -> None:
    budget = FrameBudget(limit=8)
    with pytest.raises(OverloadedError), budget.admit(9):
        pass
    assert budget.in_flight == 0
