"""scaling_bench's layouts: one RMBG-2.0 and N YOLO replicas on each card."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.scaling_bench import (
    GPU_SHARE,
    gpu_share,
    parse_assignments,
    per_card,
    placement_problems,
    scale_config,
    segmentor_cpus,
)
from benchmarks.service_bench import fit_routers

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpu-bench-trained.yaml"


@pytest.mark.parametrize("each", [1, 2, 3, 4])
def test_exactly_n_yolo_replicas_fit_beside_rmbg_on_a_card(each: int) -> None:
    rmbg, yolo = GPU_SHARE["RMBGDeployment"], gpu_share("YoloDeployment", each)
    assert rmbg + each * yolo <= 1.0
    assert rmbg + (each + 1) * yolo > 1.0  # Ray cannot pack one more on the card
    assert 2 * rmbg > 1.0  # nor a second RMBG-2.0


def test_the_config_gets_each_cards_replicas_and_their_shares() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    scale_config(
        config,
        4,
        10,
        "",
        True,
        {"decode_ahead": True},
        yolo_per_gpu=2,
        router_args={"max_frames_per_request": 64},
    )
    app = config["applications"][0]
    layout = {
        d["name"]: (d["num_replicas"], (d.get("ray_actor_options") or {}).get("num_gpus"))
        for d in app["deployments"]
    }
    assert layout["RMBGDeployment"] == (4, 0.6)
    assert layout["YoloDeployment"] == (8, 0.2)
    assert layout["Router"][0] == 10
    assert app["args"]["yolo"]["decode_ahead"] is True
    assert app["args"]["router"]["max_frames_per_request"] == 64
    assert app["args"]["router"]["max_body_bytes"] == 104857600  # the file's own kept
    one = segmentor_cpus(str(CONFIG))
    two = segmentor_cpus(str(CONFIG), 2)
    yolo_cpus = next(
        (d.get("ray_actor_options") or {}).get("num_cpus", 1)
        for d in yaml.safe_load(CONFIG.read_text())["applications"][0]["deployments"]
        if d["name"] == "YoloDeployment"
    )
    assert two - one == pytest.approx(float(yolo_cpus))


ROUND_ROBIN = "ray.serve.experimental.round_robin_router:RoundRobinRouter"


def test_yolo_options_reach_yolos_deployment_only_and_serve_reads_them() -> None:
    from ray.serve.config import RequestRouterConfig
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    options = parse_assignments(
        [
            "max_ongoing_requests=512",
            f"request_router_config={{request_router_class: {ROUND_ROBIN}}}",
        ],
        "--yolo-option",
    )
    scale_config(config, 2, 4, "", True, yolo_per_gpu=2, yolo_options=options)
    parsed = ServeDeploySchema.parse_obj(config).applications[0]
    deployments = {d.name: d for d in parsed.deployments}
    yolo = deployments["YoloDeployment"]
    assert yolo.max_ongoing_requests == 512 and yolo.num_replicas == 4
    router = RequestRouterConfig(**yolo.request_router_config).get_request_router_class()
    assert router.__name__ == "RoundRobinRouter"  # the class Serve will import and use
    rmbg = config["applications"][0]["deployments"][0]
    assert rmbg["name"] == "RMBGDeployment" and "request_router_config" not in rmbg
    assert deployments["RMBGDeployment"].max_ongoing_requests != 512


def test_placement_problems_say_what_differs_from_the_layout() -> None:
    def replica(model: str, card: str) -> dict[str, str]:
        return {"model": model, "gpu_uuid": card}

    two_each = [replica("rmbg-2.0", c) for c in "ab"] + [replica("yolo11-seg", c) for c in "aabb"]
    assert placement_problems(two_each, 2, per_card(2)) == []
    assert placement_problems(two_each, 2) == [
        "yolo: 4 replicas seen, 2 asked for",
        "yolo: more than 1 replicas on a card (['a', 'a', 'b', 'b'])",
    ]
    crowded = two_each[:2] + [replica("yolo11-seg", c) for c in "aaab"]
    assert placement_problems(crowded, 2, per_card(2)) == [
        "yolo: more than 2 replicas on a card (['a', 'a', 'a', 'b'])"
    ]
    assert placement_problems(two_each[:5], 2, per_card(2)) == [
        "yolo: 3 replicas seen, 4 asked for"
    ]


@pytest.mark.parametrize(("cpus", "routers"), [(16, 6), (14, 4), (11, 1), (64, 8)])
def test_service_bench_places_only_the_routers_the_cpus_left_can_hold(
    cpus: int, routers: int
) -> None:
    """The config's 10 segmentor CPUs (8 for RMBG-2.0, 1 for each of two YOLO) and 8 Routers
    of 1 CPU: a 16-CPU cluster holds 6 of them, never more than the config asks, at least 1."""
    config = yaml.safe_load(CONFIG.read_text())
    assert fit_routers(config, cpus) == routers
    (router,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Router"]
    assert router["num_replicas"] == routers
