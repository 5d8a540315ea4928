"""The shipped Serve configs validate: a typo in them fails here, not at deploy time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segmentation.config import ENV_VARS, load_settings
from segmentation_service.app import AppConfigError, build_app
from segmentation_service.config import AppArgs, BatchConfig
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


def test_builder_binds_three_deployments() -> None:
    app = build_app({})
    assert type(app).__name__ == "Application"
