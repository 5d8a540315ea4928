"""Rollouts of the running demo app under load, as an operator does them (``serve deploy``).

Four threads send single frames and ``/v1/frames`` requests through the project's client
while the app is deployed again with (a) a ``user_config`` change, (b) a change that
replaces the segmentor replicas (``ray_actor_options``), (c) a Router argument (which, like
any ``args`` change, replaces every replica of the app) and (d) an RMBG-2.0 model path that
does not exist, then the previous config again. ``benchmarks.rollout_bench`` drives the load
and reads Serve's status; the windows are shorter than its defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.rollout_bench import ROLLOUTS, run
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

#: Without surge (Serve's default, ``max_surge_percent: 0``) a replaced replica left no
#: replica of its deployment for as long as the new one took to start: 10-12 s here. With the
#: demo config's surge the answers never stop for that long.
LONGEST_GAP_S = 5.0


@pytest.fixture(scope="module")
def rollouts(cluster: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    base = cluster.app_config()
    try:
        report = run(
            cluster,
            base,
            cases=list(ROLLOUTS),
            window_s=10,
            baseline_s=3,
            threads=4,
            batch=4,
            frame_size=(320, 180),
            client_timeout_s=120,
            converge_timeout_s=300,
        )
        print(json.dumps(report, indent=1))  # shown with -s: the counts and Serve's events
        yield {case["case"]: case for case in report["cases"]}
    finally:
        cluster.deploy(base, "restore.yaml")
        cluster.wait_ready()


def _served_through(case: dict[str, Any]) -> None:
    assert case["frames_answered"] > 0, case
    assert case["frames_lost"] == 0, f"lost after the client's retries: {case['lost_because']}"
    assert case["calls_5xx_reaching_caller"] == 0, case
    assert set(case["statuses"]) <= {"200", "503"}, f"answers other than 200/503: {case}"


def test_a_user_config_change_reconfigures_in_place_and_loses_no_frame(
    rollouts: dict[str, dict[str, Any]],
) -> None:
    case = rollouts["user-config"]
    _served_through(case)
    assert case["converged_s"] is not None, case
    assert not any(case["replaced"].values()), f"a replica was replaced: {case}"
    assert case["longest_gap_s"] <= LONGEST_GAP_S, case


def test_replacing_the_segmentor_replicas_starts_the_new_ones_before_the_old_stop(
    rollouts: dict[str, dict[str, Any]],
) -> None:
    case = rollouts["replicas"]
    _served_through(case)
    assert case["converged_s"] is not None, case
    assert case["replaced"] == {"RMBGDeployment": True, "YoloDeployment": True, "Router": False}
    assert case["longest_gap_s"] <= LONGEST_GAP_S, case


def test_a_router_argument_replaces_every_replica_without_a_gap(
    rollouts: dict[str, dict[str, Any]],
) -> None:
    case = rollouts["router"]
    _served_through(case)
    assert case["converged_s"] is not None, case
    assert all(case["replaced"].values()), case
    assert case["longest_gap_s"] <= LONGEST_GAP_S, case


def test_a_version_that_cannot_start_leaves_the_old_one_serving_until_rolled_back(
    rollouts: dict[str, dict[str, Any]],
) -> None:
    case = rollouts["bad-model"]
    _served_through(case)
    assert case["deploy_failed_s"] is not None, f"the deploy never failed: {case}"
    assert "RMBGDeployment" in case["message"], case
    assert case["old_rmbg_replicas_kept"], f"the old RMBG-2.0 replica was stopped: {case}"
    assert case["rollback_converged_s"] is not None, case
    assert case["longest_gap_s"] <= LONGEST_GAP_S, case
