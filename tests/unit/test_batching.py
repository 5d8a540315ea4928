"""OOM-safe batching with a fault injected: the model raises OOM for batches above N."""

from __future__ import annotations

import pytest
import torch

from segmentation.batching import AdaptiveBatchCap, OOMSafeRunner, is_oom
from segmentation.errors import OverloadedError


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
    assert report.failed_frames == 0 and report.oom_splits >= 2
    assert max(n for n in model.calls if n <= 3) <= 3
    assert cap.value <= 8  # dropped after the OOMs


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


def test_other_errors_are_not_swallowed() -> None:
    def broken(items: list[int]) -> list[int]:
        raise ValueError("bad tensor shape")

    with pytest.raises(ValueError, match="bad tensor shape"):
        OOMSafeRunner(broken, AdaptiveBatchCap(4))([1, 2])


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
