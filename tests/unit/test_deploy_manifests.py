"""The files under deploy/ say what serve_config.yaml, the Makefile and the replicas say."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from segmentation_service.metrics import SegmentorMetrics
from tests.conftest import REPO_ROOT

RAYSERVICE = REPO_ROOT / "deploy" / "kuberay" / "rayservice.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "product-segmentor.json"
PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning.yaml"
SECRETS = ("SEGMENTOR_API_KEY", "HF_TOKEN")


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RAYSERVICE.read_text())
    return loaded


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    return loaded


def containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def ingress_env() -> dict[str, str]:
    """``INGRESS_ENV`` of the Makefile (what ``make serve`` starts Ray with)."""
    makefile = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^INGRESS_ENV\s*:=\s*(.*)$", makefile, re.MULTILINE)
    assert match, "the Makefile has no INGRESS_ENV"
    return dict(pair.split("=", 1) for pair in match.group(1).split())


def test_the_rayservice_deploys_exactly_serve_config_yaml(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve_config["applications"], (
        "serveConfigV2 differs from serve_config.yaml: change both"
    )
    assert embedded == serve_config


def test_the_rayservice_runs_the_ray_version_the_project_pins(
    rayservice: dict[str, Any],
) -> None:
    pins = (REPO_ROOT / "constraints.txt").read_text()
    pinned = re.search(r"^ray==(\S+)$", pins, re.MULTILINE)
    assert pinned
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == pinned.group(1)


def test_every_ray_container_starts_with_the_ingress_environment_of_make_serve(
    rayservice: dict[str, Any],
) -> None:
    wanted = ingress_env()
    assert "RAY_SERVE_ENABLE_HA_PROXY" in wanted
    for container in containers(rayservice):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {name: env.get(name) for name in wanted} == wanted, container["name"]


def test_the_api_key_comes_from_a_secret_never_from_runtime_env(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    key_variable = serve_config["applications"][0]["args"]["router"]["api_key_env"]
    assert key_variable == "SEGMENTOR_API_KEY"
    for container in containers(rayservice):
        env = {e["name"]: e for e in container["env"]}
        for name in SECRETS:
            assert "value" not in env[name], f"{container['name']}: {name} written in the file"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"], name
        assert "optional" not in env[key_variable]["valueFrom"]["secretKeyRef"]
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for app in embedded["applications"]:
        env_vars = app.get("runtime_env", {}).get("env_vars", {})
        assert not set(env_vars) & set(SECRETS), app["name"]


def test_the_gpu_workers_hold_every_segmentor_replica(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    deployments = {d["name"]: d for d in serve_config["applications"][0]["deployments"]}
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = cpus = 0.0
    for group in workers:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus += group["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
        cpus += group["maxReplicas"] * float(limits["cpu"])
    # docs/operations.md: RMBG-2.0's max_replicas is the number of GPUs in the cluster, YOLO's
    # twice it (two a card)
    for name, per_gpu in (("RMBGDeployment", 1), ("YoloDeployment", 2)):
        assert deployments[name]["autoscaling_config"]["max_replicas"] == per_gpu * gpus, name
    share = {name: d["ray_actor_options"].get("num_gpus", 0) for name, d in deployments.items()}
    assert share["RMBGDeployment"] > 0.5, "two RMBG-2.0 replicas would fit on one card"
    assert share["RMBGDeployment"] + 2 * share["YoloDeployment"] <= 1 + 1e-9
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", "replicas are placed on the workers only"
    needed = sum(
        d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["max_replicas"]
        for d in deployments.values()
    )
    assert cpus >= needed, f"workers have {cpus} CPUs, the replicas at most ask {needed}"


def test_the_weights_serve_config_names_are_on_a_mounted_volume(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    args = serve_config["applications"][0]["args"]
    paths = [args["rmbg"]["model"], args["yolo"]["model"]]
    assert all(path.startswith("/") for path in paths), paths
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            mounts = container["volumeMounts"]
            for path in paths:
                mount = next(m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/"))
                assert "persistentVolumeClaim" in volumes[mount["name"]], path
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert any(env["HF_HOME"].startswith(m["mountPath"]) for m in mounts)


def declared_series() -> dict[str, str]:
    """The series names Ray exports for the replicas' metrics, each with its type."""
    series = {}
    for metric in vars(SegmentorMetrics("any")).values():
        kind = type(metric).__name__
        if kind not in ("Counter", "Gauge", "Histogram"):
            continue
        name = f"ray_{metric._name}"
        suffixes = ("_bucket", "_sum", "_count") if kind == "Histogram" else ("",)
        series.update({name + suffix: kind for suffix in suffixes})
    return series


def test_the_dashboard_names_only_metrics_the_replicas_declare() -> None:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"\b(ray_segmentor_[a-z0-9_]+)\b", " ".join(queries)))
    declared = declared_series()
    assert used - set(declared) == set()
    # every custom metric has a panel (histograms through their buckets)
    assert {
        name
        for name in declared
        if name.endswith(("_bucket", "_total")) or declared[name] == "Gauge"
    } <= used
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_grafana_provisioning_file_loads_the_dashboard_folder() -> None:
    provisioning = yaml.safe_load(PROVISIONING.read_text())
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
