"""OOM-safe batching with a fault injected: the model raises OOM for batches above N."""

from __future__ import annotations

import pytest
import torch

from segmentation.batching import AdaptiveBatchCap, FrameRejectedError, OOMSafeRunner, is_oom
from segmentation.errors import InvalidImageError, OverloadedError, SegmentationError


class ToyModel:
    """Doubles each input; runs out of memory above ``limit`` frames (a CPU stand-in for CUDA)."""

    def __init__(self, limit: int, error: type[Exception] = torch.OutOfMemoryError) -> None:
        self.limit = limit
        self.error = error
        self.calls: list[int] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(len(items))
        if len(items) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [2 * x for x in items]


def test_oom_splits_until_batches_fit_and_nothing_is_lost() -> None:
    model = ToyModel(limit=3)
    cap = AdaptiveBatchCap(16)
    results, report = OOMSafeRunner(model, cap)(list(range(16)))
    assert results == [2 * x for x in range(16)]
    # 16 fails, its halves fail down to pairs, which fit: depth-first, in frame order
    halves = [8, 4, 2, 2, 4, 2, 2]
    assert model.calls == [16, *halves, *halves]
    assert report.calls == model.calls
    assert report.failed_frames == 0 and report.oom_splits == 7 and report.largest_run == 2
    assert cap.value == 2  # halved by each OOM, down to what failed last (4) // 2


def test_runtime_error_alloc_failures_count_as_oom() -> None:
    model = ToyModel(limit=1, error=RuntimeError)
    results, report = OOMSafeRunner(model, AdaptiveBatchCap(4))([1, 2, 3, 4])
    assert results == [2, 4, 6, 8] and report.oom_splits == 3
    assert is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_oom(RuntimeError("expected scalar type Float but found Half"))


def test_a_single_frame_that_cannot_run_gets_overloaded_others_succeed() -> None:
    class PickyModel:
        def __call__(self, items: list[int]) -> list[int]:
            if 13 in items:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return [x + 1 for x in items]

    results, report = OOMSafeRunner(PickyModel(), AdaptiveBatchCap(8))([10, 11, 12, 13, 14])
    assert results[:3] == [11, 12, 13] and results[4] == 15
    assert isinstance(results[3], OverloadedError)
    assert results[3].code == "overloaded" and results[3].retry_after_s
    assert report.failed_frames == 1


class PoisonedModel:
    """Adds one to each frame; the whole call raises ``error`` if it holds frame ``poison``."""

    def __init__(self, poison: int, error: Exception) -> None:
        self.poison = poison
        self.error = error
        self.calls: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if self.poison in items:
            raise self.error
        return [x + 1 for x in items]


def test_a_frame_the_model_refuses_fails_alone_and_the_seven_others_get_their_outputs() -> None:
    model = PoisonedModel(13, ValueError("expected 3 channels, got 4"))
    cap = AdaptiveBatchCap(8)
    results, report = OOMSafeRunner(model, cap)(list(range(10, 18)))
    assert results[:3] == [11, 12, 13] and results[4:] == [15, 16, 17, 18]
    error = results[3]
    assert isinstance(error, FrameRejectedError) and isinstance(error, InvalidImageError)
    assert error.code == "frame_rejected" and error.retry_after_s is None
    assert "ValueError: expected 3 channels, got 4" in error.message
    # halves that hold 13 are split again, depth-first; the others run whole
    assert [len(c) for c in model.calls] == [8, 4, 2, 2, 1, 1, 4]
    assert model.calls[4:] == [[12], [13], [14, 15, 16, 17]]
    assert report.rejected_frames == 1 and report.error_splits == 3
    assert report.error_frames == 0 and report.failed_frames == 0 and report.oom_splits == 0
    assert cap.value == 8  # not a memory problem: the cap stays


def test_a_server_fault_on_one_frame_is_an_internal_error_of_that_frame_only() -> None:
    model = PoisonedModel(3, RuntimeError("CUDA error: an illegal memory access"))
    results, report = OOMSafeRunner(model, AdaptiveBatchCap(4))([0, 1, 2, 3])
    assert results[:3] == [1, 2, 3]
    error = results[3]
    assert type(error) is SegmentationError and error.code == "internal_error"
    assert "illegal memory access" in error.message
    assert report.error_frames == 1 and report.rejected_frames == 0


def test_a_typed_error_of_the_model_reaches_its_frame_as_it_is() -> None:
    model = PoisonedModel(1, InvalidImageError("not a frame"))
    results, report = OOMSafeRunner(model, AdaptiveBatchCap(2))([0, 1])
    assert results[0] == 1
    assert type(results[1]) is InvalidImageError and results[1].message == "not a frame"
    assert report.rejected_frames == 1


def test_a_model_that_fails_on_everything_answers_each_frame_with_an_error() -> None:
    def broken(items: list[int]) -> list[int]:
        raise ValueError("bad tensor shape")

    results, report = OOMSafeRunner(broken, AdaptiveBatchCap(4))([1, 2])
    assert len(results) == 2 and all(isinstance(r, FrameRejectedError) for r in results)
    assert report.calls == [2, 1, 1] and report.rejected_frames == 2


def test_cap_recovers_slowly_after_sustained_success() -> None:
    cap = AdaptiveBatchCap(8, recover_after=3)
    cap.on_oom(8)
    assert cap.value == 4
    for _ in range(2):
        cap.on_success(4)
    assert cap.value == 4
    cap.on_success(4)
    assert cap.value == 5
    cap.on_success(2)  # batches smaller than the cap say nothing about it
    assert cap.value == 5
    cap.set_ceiling(3)
    assert cap.value == 3
    cap.set_ceiling(16)  # a larger max_batch_size applies at once, not after recovery
    assert cap.value == 16


def test_later_batches_respect_the_lowered_cap() -> None:
    model = ToyModel(limit=4)
    runner = OOMSafeRunner(model, AdaptiveBatchCap(8, recover_after=100))
    runner(list(range(8)))
    model.calls.clear()
    results, report = runner(list(range(8)))
    assert results == [2 * x for x in range(8)]
    assert report.oom_splits == 0
    assert model.calls == [4, 4]


def test_failed_attempt_memory_is_released_before_the_retry() -> None:
    """The retry must not run while the failed attempt's traceback is alive."""
    import gc
    import weakref

    alive: list[bool] = []
    held: list[weakref.ref[object]] = []

    class Activations:
        pass

    def model(items: list[int]) -> list[int]:
        if held:
            gc.collect()
            alive.append(held[-1]() is not None)
        big = Activations()  # referenced from this frame, as activations are in a forward
        held.append(weakref.ref(big))
        if len(items) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return items

    OOMSafeRunner(model, AdaptiveBatchCap(2))([1, 2])
    assert alive and not any(alive)


def test_batch_buckets_cover_every_size_with_little_padding() -> None:
    from segmentation.batching import batch_buckets

    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 12, 16)
    assert batch_buckets(64) == (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
    assert batch_buckets(20) == (1, 2, 4, 8, 12, 16, 20)
    for ceiling in range(1, 130):
        buckets = batch_buckets(ceiling)
        assert buckets[-1] == ceiling
        for size in range(9, ceiling + 1):  # above 8, at most a third of a batch is padding
            bucket = next(b for b in buckets if b >= size)
            assert (bucket - size) / bucket <= 1 / 3


def test_pad_to_bucket_appends_zero_frames() -> None:
    from segmentation.batching import pad_to_bucket

    batch = torch.ones(5, 3, 4, 4)
    padded = pad_to_bucket(batch, (1, 2, 4, 8))
    assert padded.shape == (8, 3, 4, 4)
    assert torch.equal(padded[:5], batch) and not padded[5:].any()
    assert pad_to_bucket(batch, None) is batch
    assert pad_to_bucket(batch, (1, 2, 4)) is batch  # larger than every bucket: as it is


def test_graph_capture_that_cannot_happen_falls_back_with_the_reason() -> None:
    """Without CUDA the capture fails; the caller gets no graphs and a readable reason."""
    from segmentation.graphs import try_capture

    if torch.cuda.is_available():
        pytest.skip("a CUDA device would capture")
    graphs, error = try_capture(
        "linear", torch.nn.Linear(2, 2), lambda out: (out,), [torch.zeros(4, 2)]
    )
    assert graphs is None
    assert error == "ValueError: Expected a cuda device, but got: cpu"
