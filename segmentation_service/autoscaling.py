"""Scale the segmentors on the frames their replicas hold, not on the calls they receive.

Serve's default policy divides the ongoing *calls* by ``target_ongoing_requests``. A call is
one frame from ``/v1/products`` or ``/v1/remove-background`` but up to ``frames_per_call``
(16) frames from ``/v1/frames``, so the same call count means 1x or 16x the GPU work and
frame-heavy traffic looked 16 times lighter than it was. Each segmentor replica reports the
frames it holds (queued for the GPU plus the running batch) through Serve's
``record_autoscaling_stats`` hook (:data:`HELD_FRAMES`); :class:`FramesPerReplicaPolicy`
sizes the deployment so each replica holds about ``target_frames_per_replica`` of them (two
full batches: one running, one forming behind it).

Public Ray Serve 2.60 API only: ``autoscaling_config.policy.policy_function`` names this class
and ``policy_kwargs`` are its constructor's arguments; Serve instantiates it once, averages
each replica's reports over ``look_back_period_s`` (``ctx.aggregated_metrics``) and still
applies ``min_replicas``/``max_replicas``, the up/down delays and the scaling factors to what
it returns. Serve pickles this module by value into its controller, so it imports nothing of
the project.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

#: Key of the frames a replica holds in its ``record_autoscaling_stats`` answer.
HELD_FRAMES = "held_frames"


class FramesPerReplicaPolicy:
    """Replicas needed for each to hold ``target_frames_per_replica`` frames.

    The frames counted are those every running replica reported (averaged over the look-back
    window) plus the calls Serve still queues at handles, each counted as
    ``frames_per_queued_call`` frames: such calls wait only once every replica is at its
    ``max_ongoing_requests``, so counting them as full calls errs towards scaling up. Until
    any replica has reported frames (replicas starting, or a hook that failed and was turned
    off by Serve) it falls back to Serve's default policy on calls.
    """

    def __init__(
        self, target_frames_per_replica: float, frames_per_queued_call: float = 16.0
    ) -> None:
        if not (math.isfinite(target_frames_per_replica) and target_frames_per_replica > 0):
            raise ValueError(
                "policy_kwargs.target_frames_per_replica must be a positive number, got "
                f"{target_frames_per_replica!r}"
            )
        if not (math.isfinite(frames_per_queued_call) and frames_per_queued_call >= 0):
            raise ValueError(
                "policy_kwargs.frames_per_queued_call must be zero or more, got "
                f"{frames_per_queued_call!r}"
            )
        self.target_frames_per_replica = float(target_frames_per_replica)
        self.frames_per_queued_call = float(frames_per_queued_call)

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}  # Serve's cold start path scales from zero
        held = (ctx.aggregated_metrics or {}).get(HELD_FRAMES)
        if not held:
            return replica_queue_length_autoscaling_policy(ctx)
        queued_calls = ctx.total_queued_requests or 0.0
        frames = sum(held.values()) + queued_calls * self.frames_per_queued_call
        return frames / self.target_frames_per_replica, {}
