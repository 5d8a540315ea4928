"""The shipped Serve configs validate: a typo in them fails here, not at deploy time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application, Deployment

from segmentation.config import ENV_VARS, load_settings
from segmentation_service.app import AppConfigError, build_app
from segmentation_service.config import AppArgs, BatchConfig, RouterArgs, SegmentorArgs
from tests.conftest import REPO_ROOT

CONFIGS = [REPO_ROOT / "serve_config.yaml", *sorted((REPO_ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "segmentation_service.app:build_app"
    AppArgs.model_validate(app["args"])
    env = app["runtime_env"]["env_vars"]
    assert set(env) <= set(ENV_VARS) | {"HF_HUB_OFFLINE", "YOLO_OFFLINE"}
    load_settings(env)
    names = {d["name"] for d in app["deployments"]}
    assert names == {"RMBGDeployment", "YoloDeployment", "Router"}
    for deployment in app["deployments"]:
        if "user_config" in deployment:
            BatchConfig.model_validate(deployment["user_config"])
        if deployment["name"] != "Router":
            assert "num_gpus" in deployment["ray_actor_options"]


def test_builder_names_every_bad_argument() -> None:
    with pytest.raises(AppConfigError) as info:
        build_app({"rmbg": {"colour": "blue"}, "yolo": {"input_size": 650}})
    message = str(info.value)
    assert "args.rmbg.colour" in message
    assert "multiple of 32" in message


def _deployments(app: Application, name: str = "app") -> dict[str, Deployment]:
    """The deployments Serve makes of ``app``, by name (what ``serve deploy`` builds first)."""
    from ray.serve._private.build_app import build_app as serve_build

    built = serve_build(app, name=name)
    assert built.ingress_deployment_name == "Router"
    return {d.name: d for d in built.deployments}


def test_builder_binds_both_segmentors_behind_the_router_with_their_code_defaults() -> None:
    deployments = _deployments(build_app({}))
    assert set(deployments) == {"RMBGDeployment", "YoloDeployment", "Router"}
    rmbg, yolo, router = (deployments[n] for n in ("RMBGDeployment", "YoloDeployment", "Router"))
    rmbg_handle, yolo_handle, router_args = router.init_args
    assert (rmbg_handle.deployment_name, yolo_handle.deployment_name) == (
        "RMBGDeployment",
        "YoloDeployment",
    )
    assert router_args == RouterArgs().model_dump()
    assert rmbg.init_args == (SegmentorArgs().model_dump(),)
    assert yolo.init_args == (SegmentorArgs().model_dump(),)
    assert (rmbg.max_ongoing_requests, yolo.max_ongoing_requests) == (64, 128)
    assert router.max_ongoing_requests == 256
    # A replica whose GPU broke must be found and replaced within seconds.
    assert rmbg._deployment_config.health_check_period_s == 10
    assert yolo._deployment_config.health_check_period_s == 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_reaches_each_deployment(path: Path) -> None:
    """The arguments each replica is built with, and the options Serve applies from the
    config's ``deployments`` list (as ``serve deploy`` does, through ``Deployment.options``)."""
    (app,) = yaml.safe_load(path.read_text())["applications"]
    deployments = _deployments(build_app(app["args"]), app["name"])
    args = AppArgs.model_validate(app["args"])
    (rmbg_args,) = deployments["RMBGDeployment"].init_args
    (yolo_args,) = deployments["YoloDeployment"].init_args
    assert (
        rmbg_args == args.rmbg.model_dump() and rmbg_args["model"] == app["args"]["rmbg"]["model"]
    )
    assert (
        yolo_args == args.yolo.model_dump() and yolo_args["model"] == app["args"]["yolo"]["model"]
    )
    assert deployments["Router"].init_args[2] == args.router.model_dump()
    for entry in app["deployments"]:
        options = {k: v for k, v in entry.items() if k != "name"}
        deployment = deployments[entry["name"]].options(**options)
        assert deployment.max_ongoing_requests == entry["max_ongoing_requests"]
        assert deployment.max_queued_requests == entry["max_queued_requests"]
        gpus = deployment.ray_actor_options.get("num_gpus", 0)
        if entry["name"] == "Router":
            assert gpus == 0, "the router decodes and routes: it must not hold a GPU share"
            assert deployment.user_config is None
        else:
            assert gpus == entry["ray_actor_options"]["num_gpus"]
            config = BatchConfig.model_validate(deployment.user_config)
            assert config.model_dump(exclude_unset=True) == entry["user_config"]
