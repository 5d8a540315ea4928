"""Scaling on frames: what a replica reports to Serve's autoscaler, the policy that reads it
(called with Serve's own ``AutoscalingContext``, no cluster), the policy the shipped config
names, and the bounded stage totals of ``/v1/models``."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import yaml
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from segmentation_service.autoscaling import HELD_FRAMES, FramesPerReplicaPolicy
from segmentation_service.metrics import StageTotals
from tests.conftest import REPO_ROOT
from tests.unit.test_replica import frame, replica


def context(
    held: dict[str, float] | None,
    *,
    replicas: int,
    calls: float = 0.0,
    queued_calls: float = 0.0,
    target_ongoing_requests: float = 32.0,
) -> AutoscalingContext:
    """Serve's context for one autoscaling tick, with each replica's averaged ``held_frames``
    (None: no replica has reported custom metrics)."""
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="RMBGDeployment",
        app_name="product-segmentor",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=calls,
        total_queued_requests=queued_calls,
        aggregated_metrics={HELD_FRAMES: held} if held is not None else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(
            min_replicas=1, max_replicas=8, target_ongoing_requests=target_ongoing_requests
        ),
    )


def test_replica_reports_the_frames_it_holds_queued_and_running() -> None:
    rep = replica()

    async def scenario() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        await rep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.0})
        idle = await rep.record_autoscaling_stats()
        rep.segmentor.delay_s = 0.3
        first = asyncio.ensure_future(rep.submit_each([frame(v) for v in range(1, 5)], None, None))
        await asyncio.sleep(0.1)  # frames 1-4 run on the GPU thread
        rest = asyncio.ensure_future(rep.submit_each([frame(v) for v in range(5, 11)], None, None))
        await asyncio.sleep(0.05)  # frames 5-10 wait behind them
        busy = await rep.record_autoscaling_stats()
        await first
        await rest
        return idle, busy, await rep.record_autoscaling_stats()

    idle, busy, done = asyncio.run(scenario())
    assert idle == {HELD_FRAMES: 0.0}
    assert busy == {HELD_FRAMES: 10.0}  # 4 in the running batch + 6 queued
    assert done == {HELD_FRAMES: 0.0}
    assert asyncio.run(rep.info())["frames"]["ok"] == 10


def test_frames_not_calls_decide_the_replica_count() -> None:
    policy = FramesPerReplicaPolicy(target_frames_per_replica=32)
    # Two replicas with 4 calls each: by calls (target 32) one replica would do, but the calls
    # carry 16 frames each: 128 frames are two full batches for four replicas.
    desired, state = policy(context({"r1": 64.0, "r2": 64.0}, replicas=2, calls=8))
    assert desired == pytest.approx(4.0) and state == {}
    desired, _ = policy(context({"r1": 3.0, "r2": 5.0}, replicas=2, calls=8))
    assert desired == pytest.approx(0.25)  # Serve rounds up and keeps min_replicas


def test_calls_waiting_at_handles_count_as_full_calls() -> None:
    policy = FramesPerReplicaPolicy(target_frames_per_replica=32, frames_per_queued_call=16)
    desired, _ = policy(context({"r1": 64.0}, replicas=1, queued_calls=6))
    assert desired == pytest.approx((64 + 6 * 16) / 32)


def test_without_frame_reports_it_scales_on_calls_like_serve() -> None:
    policy = FramesPerReplicaPolicy(target_frames_per_replica=32)
    desired, _ = policy(context(None, replicas=2, calls=128, target_ongoing_requests=32))
    assert desired == pytest.approx(4.0)  # 128 calls / 32 per replica
    assert policy(context(None, replicas=0, calls=0))[0] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_frames_per_replica": 0},
        {"target_frames_per_replica": math.nan},
        {"target_frames_per_replica": 32, "frames_per_queued_call": -1},
    ],
)
def test_a_bad_policy_argument_is_refused_with_its_name(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"policy_kwargs.{next(reversed(kwargs))}"):
        FramesPerReplicaPolicy(**kwargs)


def test_shipped_config_scales_each_segmentor_on_two_full_batches_of_frames() -> None:
    """What Serve builds from ``serve_config.yaml``: the policy by value, instantiated with
    its ``policy_kwargs`` (as the controller does), targeting two batches of the user_config."""
    (app,) = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())["applications"]
    segmentors = [d for d in app["deployments"] if d["name"] != "Router"]
    assert {d["name"] for d in segmentors} == {"RMBGDeployment", "YoloDeployment"}
    for deployment in segmentors:
        config = AutoscalingConfig(**deployment["autoscaling_config"])
        policy_class = config.policy.get_policy()  # unpickled from the serialized definition
        assert policy_class.__name__ == "FramesPerReplicaPolicy"
        policy = policy_class(**config.policy.policy_kwargs)
        batch = deployment["user_config"]["max_batch_size"]
        assert policy.target_frames_per_replica == 2 * batch
        held = {"r1": 4.0 * batch}  # four full batches held by the one replica
        assert policy(context(held, replicas=1))[0] == pytest.approx(2.0)


def test_stage_totals_keep_at_most_their_bound_and_fold_the_rest_into_other() -> None:
    totals = StageTotals(max_keys=64)
    for i in range(1000):
        totals.add(f"codec:fn{i}", 0.001 * (i % 7 + 1))
    totals.add("codec:fn0", 0.002)  # a key kept before the bound still counts for itself
    summary = totals.summary()
    assert len(summary) == 64
    assert summary["codec:fn0"]["count"] == 2 and summary["codec:fn0"]["mean_ms"] == 1.5
    assert summary[StageTotals.OTHER]["count"] == 1000 - 63
    assert "codec:fn63" not in summary and "codec:fn999" not in summary
    assert sum(s["count"] for s in summary.values()) == 1001
    total_ms = sum(s["count"] * s["mean_ms"] for s in summary.values())
    expected_ms = sum(1.0 * (i % 7 + 1) for i in range(1000)) + 2.0
    assert total_ms == pytest.approx(expected_ms, rel=1e-3)
