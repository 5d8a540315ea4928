"""The replica's one batching path, per-frame failures and live reconfigure, with a toy model
(no Ray Serve): frames are tiny uniform arrays and the toy answers twice their value."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from segmentation.batching import FrameRejectedError
from segmentation.config import Settings
from segmentation.errors import DeadlineExceededError, OverloadedError, SegmentationError
from segmentation.models.base import ModelInfo
from segmentation.transfer import Arrival, HostCopy
from segmentation_service.autoscaling import HELD_FRAMES
from segmentation_service.config import SegmentorArgs
from segmentation_service.errors import http_status
from segmentation_service.replica import Pending, SegmentorReplica, _weights_sha256

T = TypeVar("T")
WARMUP = -1  # what the toy answers for a warm-up frame


class ToySegmentor:
    """Doubles each frame's value; counts calls running at once and records each call."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batch_buckets: tuple[int, ...] | None = None
        self.delay_s = 0.0
        self.fail_warmup_at: int | None = None
        self.calls: list[tuple[str, list[int]]] = []  # (thread name, values)
        self.active = 0
        self.most_active = 0
        self.graphs_for: tuple[int, ...] | None = None
        self.compile: dict[str, Any] | None = None  # what /v1/models' compile would say
        self.started = threading.Event()  # set when a call on request frames begins
        self._lock = threading.Lock()

    def info(self) -> ModelInfo:
        return ModelInfo(
            "toy", "toy/hub-id", None, "fp32", "toy", "cpu", False, compile=self.compile
        )

    def predict(self, frames: list[np.ndarray]) -> list[int]:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            values = [int(f[0, 0, 0]) if f.shape[0] == 2 else WARMUP for f in frames]
            self.calls.append((threading.current_thread().name, values))
            if values[0] != WARMUP:
                self.started.set()
            time.sleep(self.delay_s)
            if values[0] == WARMUP and len(values) == self.fail_warmup_at:
                raise RuntimeError(f"warm-up at batch {len(values)} failed")
            return [2 * v for v in values]
        finally:
            with self._lock:
                self.active -= 1

    def request_calls(self) -> list[list[int]]:
        return [values for _, values in self.calls if values[0] != WARMUP]


class ToyReplica(SegmentorReplica):
    name = "toy"
    segmentor: ToySegmentor

    def load(self, args: SegmentorArgs, settings: Settings) -> ToySegmentor:
        return ToySegmentor()

    def run_model(self, items: list[Pending]) -> list[Any]:
        return list(self.segmentor.predict([item.frame for item in items]))

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        self.segmentor.graphs_for = batch_sizes


def replica(**args: Any) -> ToyReplica:
    return ToyReplica({"warmup_size": (4, 4), **args})


def frame(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, dtype=np.uint8)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def model_busy(rep: ToyReplica) -> None:
    """Until the model has started on a request frame (not a fixed sleep: CI machines are busy)."""
    assert await asyncio.to_thread(rep.segmentor.started.wait, 30)


async def submit_all(rep: ToyReplica, values: list[int], deadline: float | None = None) -> list:
    return await rep.submit_each([frame(v) for v in values], None, deadline)


def test_frames_arriving_while_the_model_runs_form_full_batches_at_the_cap() -> None:
    rep = replica()

    async def scenario() -> tuple[Any, list[Any]]:
        await rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0})
        rep.segmentor.delay_s = 0.1
        first = asyncio.ensure_future(rep.submit(frame(1), None, None))
        await model_busy(rep)  # the model is busy with frame 1 now
        rest = await submit_all(rep, list(range(10, 18)))
        return await first, rest

    first, rest = run(scenario())
    assert first == 2 and rest == [2 * v for v in range(10, 18)]
    assert rep.segmentor.request_calls() == [[1], list(range(10, 14)), list(range(14, 18))]
    info = run(rep.info())
    assert info["batch"]["batches_run"] == 3 and info["batch"]["largest_batch"] == 4
    assert info["frames"]["ok"] == 9


def test_fewer_frames_than_the_cap_wait_for_the_window_then_run_together() -> None:
    rep = replica()

    async def scenario() -> list[Any]:
        await rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.2})
        early = asyncio.ensure_future(submit_all(rep, [1, 2]))
        await asyncio.sleep(0.05)  # inside the window of frames 1 and 2
        late = await submit_all(rep, [3])
        return [*(await early), *late]

    assert run(scenario()) == [2, 4, 6]
    assert rep.segmentor.request_calls() == [[1, 2, 3]]


def test_one_bad_frame_in_a_merged_batch_fails_alone_with_a_400() -> None:
    rep = replica(fault_fail_frame_value=7)

    async def scenario() -> list[Any]:
        await rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.5})
        return await submit_all(rep, [3, 4, 5, 6, 7, 8, 9, 10])

    results = run(scenario())
    assert results[:4] == [6, 8, 10, 12] and results[5:] == [16, 18, 20]
    assert isinstance(results[4], FrameRejectedError) and http_status(results[4]) == 400
    assert "value 7" in results[4].message
    # one batch of 8 (the fault raises before the model sees it), split down to frame 7
    assert rep.segmentor.request_calls() == [[3, 4, 5, 6], [8], [9, 10]]
    info = run(rep.info())
    assert info["frames"]["ok"] == 7 and info["frames"]["bad_input"] == 1
    assert info["batch"]["error_splits"] == 3 and info["batch"]["batches_run"] == 1


def test_a_frame_whose_deadline_passes_in_the_queue_never_reaches_the_model() -> None:
    rep = replica()

    async def scenario() -> list[Any]:
        await rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0})
        rep.segmentor.delay_s = 0.2
        busy = asyncio.ensure_future(submit_all(rep, [1]))
        await model_busy(rep)
        late = await submit_all(rep, [2], deadline=time.time() + 0.05)
        return [*(await busy), *late]

    results = run(scenario())
    assert results[0] == 2 and isinstance(results[1], DeadlineExceededError)
    assert rep.segmentor.request_calls() == [[1]]
    assert run(rep.info())["frames"]["deadline"] == 1


def test_a_full_queue_answers_overloaded_with_retry_after() -> None:
    rep = replica(max_queued_frames=2)

    async def scenario() -> list[Any]:
        await rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0})
        rep.segmentor.delay_s = 0.2
        busy = asyncio.ensure_future(submit_all(rep, [1]))
        await model_busy(rep)  # frame 1 left the queue for the model
        queued = await submit_all(rep, [2, 3, 4])
        return [*(await busy), *queued]

    results = run(scenario())
    assert results[:3] == [2, 4, 6]
    assert isinstance(results[3], OverloadedError) and results[3].retry_after_s == 1
    assert run(rep.info())["frames"]["overloaded"] == 1
    assert rep.segmentor.request_calls() == [[1], [2, 3]]


@pytest.mark.parametrize("failing_size", [16, 12], ids=["warm-up", "bucket-build"])
def test_a_reconfigure_whose_warm_up_fails_keeps_the_old_config_and_buckets(
    failing_size: int,
) -> None:
    rep = replica()

    async def scenario() -> None:
        await rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.01})
        rep.segmentor.fail_warmup_at = failing_size
        with pytest.raises(RuntimeError, match=r"could not be applied.*still running"):
            await rep.reconfigure({"max_batch_size": 16, "batch_wait_timeout_s": 0.3})

    run(scenario())
    assert rep.batch_config.max_batch_size == 4 and rep.batch_config.batch_wait_timeout_s == 0.01
    assert rep.segmentor.batch_buckets == (1, 2, 4)
    assert rep.segmentor.graphs_for == (1, 2, 4)
    assert rep.cap.value == 4 and rep.warmed_batch == 4
    assert run(rep.info())["batch"]["batch_sizes"] == [1, 2, 4]


def test_a_wait_only_change_keeps_the_cap_an_oom_lowered() -> None:
    rep = replica(fault_oom_above_batch=2)

    async def scenario() -> list[Any]:
        await rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.5})
        results = await submit_all(rep, list(range(8)))
        assert rep.cap.value == 2  # 8 and 4 ran out of memory
        await rep.reconfigure(
            {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "oom_recover_after": 7}
        )
        return results

    assert run(scenario()) == [2 * v for v in range(8)]
    assert rep.cap.value == 2 and rep.cap.recover_after == 7
    assert rep.batch_config.batch_wait_timeout_s == 0.05
    run(rep.reconfigure({"max_batch_size": 6}))  # a new maximum applies at once
    assert rep.cap.value == 6


def test_reconfigure_during_a_running_batch_never_runs_the_model_beside_it() -> None:
    rep = replica()

    async def scenario() -> tuple[list[Any], int]:
        await rep.reconfigure({"max_batch_size": 2, "batch_wait_timeout_s": 0.0})
        rep.segmentor.delay_s = 0.05
        batches = asyncio.ensure_future(submit_all(rep, list(range(6))))
        await model_busy(rep)  # the first batch is running
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        await rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
        ticking.cancel()
        return await batches, ticks

    results, ticks = run(scenario())
    assert results == [2 * v for v in range(6)]
    assert rep.segmentor.most_active == 1
    threads = {thread for thread, _ in rep.segmentor.calls}
    assert threads and all(t.startswith("toy-gpu") for t in threads)
    # warm-ups: 1 and 2, then 1 and 8 (peaks), 4 (the one new bucket size) and 8 again (the
    # new largest, with the new sizes in place), all on it
    warmups = [len(v) for _, v in rep.segmentor.calls if v[0] == WARMUP]
    assert warmups == [1, 2, 1, 8, 4, 8]
    assert rep.segmentor.batch_buckets == (1, 2, 4, 8) and rep.cap.value == 8
    assert ticks >= 3, "the event loop was blocked during the reconfigure"


def test_startup_is_ready_only_once_the_first_config_is_warmed_up() -> None:
    rep = replica()
    rep.segmentor.delay_s = 0.05  # each warm-up call takes this long
    assert run(rep.info())["startup_s"]["ready"] is None  # loaded, not yet warmed up
    run(rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0}))
    startup = run(rep.info())["startup_s"]
    warmups = len(rep.segmentor.calls)
    assert warmups >= 3  # buckets 1, 2 and 4, at least
    assert startup["ready"] >= startup["load"] + warmups * 0.05 - 0.01  # 2-decimal rounding
    run(rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.0}))
    assert run(rep.info())["startup_s"] == startup  # a later reconfigure is not a start


@pytest.mark.parametrize("misses", [0, 2])
def test_graphs_compiled_despite_an_artifact_are_named_in_a_warning_once(
    misses: int, caplog: pytest.LogCaptureFixture
) -> None:
    rep = replica()
    rep.segmentor.compile = {
        "artifact": "/models/compiled/k.inductor",
        "inductor_cache": {"hits": 1, "misses": misses},
    }
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        run(rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0}))
        run(rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.0}))
    warnings = [r.getMessage() for r in caplog.records if "artifact" in r.getMessage()]
    if misses:
        assert len(warnings) == 1, warnings  # at start-up, not at each reconfigure
        assert "compiled 2 graph(s)" in warnings[0]
        assert "/models/compiled/k.inductor" in warnings[0]
    else:
        assert warnings == []


def test_a_compile_report_that_cannot_be_read_is_logged_and_the_replica_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rep = replica()
    rep.segmentor.compile = "garbled"  # type: ignore[assignment]  # not the mapping it should be
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        run(rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0}))
    assert run(rep.info())["startup_s"]["ready"] is not None
    assert rep.cap.value == 4
    failed = [r for r in caplog.records if "reading the compile report failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None


def test_weights_sha256_of_local_models_and_none_for_hub_ids(tmp_path: Path) -> None:
    model_dir = tmp_path / "rmbg"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    checkpoint = tmp_path / "yolo.pt"
    checkpoint.write_bytes(b"checkpoint")
    assert _weights_sha256(str(model_dir)) == hashlib.sha256(b"weights").hexdigest()
    assert _weights_sha256(str(checkpoint)) == hashlib.sha256(b"checkpoint").hexdigest()
    assert _weights_sha256("briaai/RMBG-2.0") is None
    assert run(replica().info())["weights_sha256"] is None


def test_a_caller_that_goes_away_takes_its_frames_out_of_the_queue_at_once() -> None:
    """Frames whose request was cancelled neither hold queue slots until the next batch
    forms, nor reach the model, nor count as answered: they are counted ``cancelled``. Frames
    of other callers queued ahead of them stay (the queue is searched by identity: comparing
    frames would compare their pixel arrays)."""
    rep = replica(max_queued_frames=5)

    async def scenario() -> tuple[int, int, list[Any], dict[str, float]]:
        await rep.reconfigure({"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
        rep.segmentor.delay_s = 0.3
        first = asyncio.ensure_future(rep.submit(frame(1), None, None))
        await model_busy(rep)
        staying = asyncio.ensure_future(submit_all(rep, [10]))
        await asyncio.sleep(0.02)
        leaving = asyncio.ensure_future(submit_all(rep, [20, 21, 22]))
        await asyncio.sleep(0.05)
        queued = len(rep._queue)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        # The slots are free at once: a new caller gets in although the model is still busy.
        later = await submit_all(rep, [30, 31, 32, 33])
        await first
        return queued, len(later), await staying, await rep.record_autoscaling_stats()

    queued, answered, stayed, held = run(scenario())
    assert queued == 4 and answered == 4 and stayed == [20]
    assert all(v not in (20, 21, 22) for call in rep.segmentor.request_calls() for v in call)
    frames = run(rep.info())["frames"]
    assert frames["cancelled"] == 3 and frames["ok"] == 6
    assert held == {HELD_FRAMES: 0.0}


def test_the_first_failure_cancels_the_other_calls_of_a_request() -> None:
    from segmentation_service.concurrency import all_or_cancel

    ended: list[str] = []

    async def slow(name: str) -> str:
        try:
            await asyncio.sleep(5)
            return name
        finally:
            ended.append(name)

    async def failing() -> str:
        await asyncio.sleep(0.05)
        raise OverloadedError("busy", 1)

    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(OverloadedError):
            await all_or_cancel([slow("a"), failing(), slow("b")])
        return time.monotonic() - started

    assert run(scenario()) < 2.0
    assert sorted(ended) == ["a", "b"]  # both ended (cancelled) before the error came out
    assert run(all_or_cancel(asyncio.sleep(0, result=n) for n in range(3))) == [0, 1, 2]


def test_new_batch_sizes_run_their_largest_once_more_with_the_sizes_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What runs at a batch size can follow the sizes (RMBG-2.0's compiled decoder compiles
    for the largest only), so after a change the new largest runs once with the new sizes in
    place, also where it ran before under the old ones: never a compile in a request."""
    rep = replica()
    ran: list[tuple[int, tuple[int, ...] | None]] = []
    predict = rep.segmentor.predict

    def recording(frames: list[np.ndarray]) -> list[int]:
        ran.append((len(frames), rep.segmentor.batch_buckets))
        return predict(frames)

    monkeypatch.setattr(rep.segmentor, "predict", recording)
    run(rep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.01}))
    assert ran[-1] == (4, (1, 2, 4, 8))  # the first sizes: 8 ran before them, as the peak
    ran.clear()
    run(rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.01}))
    assert ran == [(4, (1, 2, 4))]  # 4 ran before, as a smaller size of 8's
    assert rep.segmentor.batch_buckets == (1, 2, 4)


class HeldCopy(HostCopy):
    """A copy to the host still under way until ``gate`` opens (on a GPU: the copy stream's
    event), or one that fails (a device error, which a CPU cannot cause)."""

    def __init__(self, arrays: list[np.ndarray], gate: threading.Event, fail: bool) -> None:
        super().__init__(arrays)
        self.gate, self.fail = gate, fail

    def wait(self) -> list[np.ndarray]:
        assert self.gate.wait(30)
        if self.fail:
            raise RuntimeError("CUDA error: the copy to the host failed (test double)")
        return self.arrays


class ArrivingReplica(ToyReplica):
    """Answers as RMBG-2.0's replica does: outputs still on their way to the host."""

    def __init__(self, args: dict[str, Any]) -> None:
        #: Per request batch, in order: the gate its copy waits on, and whether it fails.
        self.copies: list[tuple[threading.Event, bool]] = []
        self.held: list[HeldCopy] = []  # the request batches' copies, in order
        super().__init__(args)

    def run_model(self, items: list[Pending]) -> list[Any]:
        values = self.segmentor.predict([item.frame for item in items])
        warmup = all(v == 2 * WARMUP for v in values)
        gate, fail = (threading.Event(), False) if warmup else self.copies.pop(0)
        if warmup:
            gate.set()
        arrays = [np.array(v) for v in values]
        copy = HeldCopy(arrays, gate, fail)
        if not warmup:
            self.held.append(copy)
        return Arrival(copy, lambda hosts: [int(h) for h in hosts], len(arrays)).each()


async def second_batch_ran(rep: ToyReplica) -> None:
    while len(rep.segmentor.request_calls()) < 2:
        await asyncio.sleep(0.01)


def test_a_batch_runs_while_the_one_before_is_still_copied_and_each_is_answered() -> None:
    rep = ArrivingReplica({"warmup_size": (4, 4)})
    first_copy, second_copy = threading.Event(), threading.Event()
    rep.copies = [(first_copy, False), (second_copy, False)]

    async def scenario() -> tuple[list[Any], list[Any]]:
        await rep.reconfigure({"max_batch_size": 2, "batch_wait_timeout_s": 0.0})
        first = asyncio.ensure_future(submit_all(rep, [1, 2]))
        await model_busy(rep)
        second = asyncio.ensure_future(submit_all(rep, [3, 4]))
        # the GPU thread takes the second batch while the first is still being copied
        await asyncio.wait_for(second_batch_ran(rep), 30)
        assert not first.done()
        first_copy.set()
        second_copy.set()
        return await first, await second

    first, second = run(scenario())
    assert first == [2, 4] and second == [6, 8]
    assert rep.segmentor.request_calls() == [[1, 2], [3, 4]]
    stages = run(rep.info())["stages"]
    assert stages["copy_wait"]["count"] == 2


def test_a_failed_copy_fails_its_own_batch_and_the_replica_serves_on() -> None:
    rep = ArrivingReplica({"warmup_size": (4, 4)})
    opened = threading.Event()
    opened.set()
    rep.copies = [(opened, True), (opened, False)]

    async def scenario() -> tuple[list[Any], list[Any]]:
        await rep.reconfigure({"max_batch_size": 2, "batch_wait_timeout_s": 0.0})
        lost = await submit_all(rep, [1, 2])
        return lost, await submit_all(rep, [3, 4])

    lost, served = run(scenario())
    assert all(isinstance(r, SegmentationError) and http_status(r) == 500 for r in lost)
    assert "could not be copied" in lost[0].message
    assert served == [6, 8]


def test_a_reconfigure_waits_for_the_batch_still_being_copied() -> None:
    """Before it measures memory or captures graphs, a reconfigure waits on the GPU thread for
    the outputs still arriving (their copy thread's wait ends first): no other thread then
    touches the device during a capture, and their memory is not counted."""
    rep = ArrivingReplica({"warmup_size": (4, 4)})
    gate = threading.Event()
    rep.copies = [(gate, False)]

    async def scenario() -> list[Any]:
        await rep.reconfigure({"max_batch_size": 2, "batch_wait_timeout_s": 0.0})
        answers = asyncio.ensure_future(submit_all(rep, [1, 2]))
        await model_busy(rep)
        while not rep.held:
            await asyncio.sleep(0.01)
        change = asyncio.ensure_future(rep.reconfigure({"max_batch_size": 4}))
        await asyncio.sleep(0.3)
        assert not change.done() and not answers.done()  # the reconfigure waits for the copy
        gate.set()
        await change
        return await answers

    assert run(scenario()) == [2, 4]
    assert rep.batch_config.max_batch_size == 4
