"""The preflight check says, before Ray starts, why a config cannot run here and what fixes it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from segmentation_service import preflight
from segmentation_service.preflight import cards_needed, check_config, count_gpus
from tests.conftest import REPO_ROOT

HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _serve_config(rmbg: str, yolo: str) -> dict[str, Any]:
    """The shipped serve_config.yaml with its model paths pointed elsewhere (router limits,
    which the preflight does not check, left at their defaults)."""
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["router"] = {}
    args["rmbg"]["model"] = rmbg
    args["yolo"]["model"] = yolo
    return config


def _rmbg_dir(root: Path, *, weights: bool = True) -> Path:
    """A model directory in the RMBG-2.0 layout (files empty: only their presence counts)."""
    model = root / "RMBG-2.0"
    model.mkdir()
    auto_map = {
        "AutoConfig": "BiRefNet_config.BiRefNetConfig",
        "AutoModelForImageSegmentation": "birefnet.BiRefNet",
    }
    (model / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    (model / "BiRefNet_config.py").write_text("")
    (model / "birefnet.py").write_text("")
    if weights:
        (model / "model.safetensors").write_bytes(b"")
    return model


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, Path]:
    yolo = tmp_path / "yolo11m-seg.pt"
    yolo.write_bytes(b"")
    return _rmbg_dir(tmp_path), yolo


def test_the_shipped_config_needs_one_card_and_without_one_points_to_the_demo() -> None:
    # RMBG 0.6 and YOLO 0.2 share a card: one card holds them (and a second YOLO).
    config = _serve_config("standin:tiny-birefnet", "standin:yolo11n-seg")
    assert check_config(config, {}, gpus=1) == []
    (finding,) = check_config(config, {}, gpus=0)
    assert finding.subject == "GPU"
    assert "need 1 GPU(s)" in finding.cause and "this machine has no GPU" in finding.cause
    assert "RMBGDeployment 1 x num_gpus 0.6" in finding.cause
    assert "make demo" in finding.fix


def test_replicas_that_do_not_share_a_card_need_a_card_each() -> None:
    assert cards_needed([0.5, 0.5, 0.5, 0.25, 0.25]) == 2
    assert cards_needed([0.6, 0.6]) == 2
    assert cards_needed([1, 2, 0.5]) == 4
    assert cards_needed([]) == 0
    config = _serve_config("standin:tiny-birefnet", "standin:yolo11n-seg")
    rmbg_scaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    rmbg_scaling["min_replicas"] = rmbg_scaling["max_replicas"] = 2  # two 0.6 need two cards
    (finding,) = check_config(config, {}, gpus=1)
    assert "need 2 GPU(s)" in finding.cause and "has 1 GPU(s)" in finding.cause
    assert "make demo" not in finding.fix


def test_the_cpu_demo_passes_without_gpu_or_weights() -> None:
    config = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    assert check_config(config, {}, gpus=0) == []


def test_weights_in_place_pass(weights: tuple[Path, Path]) -> None:
    rmbg, yolo = weights
    assert check_config(_serve_config(str(rmbg), str(yolo)), {}, gpus=1) == []


def test_a_missing_rmbg_directory_names_the_download_command(
    tmp_path: Path, weights: tuple[Path, Path]
) -> None:
    missing = tmp_path / "models" / "RMBG-2.0"
    (finding,) = check_config(_serve_config(str(missing), str(weights[1])), {}, gpus=1)
    assert finding.cause == f"{missing} does not exist"
    assert finding.fix.endswith(f"then `hf download briaai/RMBG-2.0 --local-dir {missing}`")
    assert "hf auth login" in finding.fix


def test_a_directory_without_weights_names_the_missing_file(
    tmp_path: Path, weights: tuple[Path, Path]
) -> None:
    (tmp_path / "partial").mkdir()
    partial = _rmbg_dir(tmp_path / "partial", weights=False)
    (partial / "birefnet.py").unlink()
    (finding,) = check_config(_serve_config(str(partial), str(weights[1])), {}, gpus=1)
    assert finding.cause == f"{partial} has no model.safetensors, birefnet.py"
    assert f"--local-dir {partial}" in finding.fix


def test_a_missing_yolo_checkpoint_says_where_to_put_it(
    tmp_path: Path, weights: tuple[Path, Path]
) -> None:
    missing = tmp_path / "models" / "yolo11m-seg.pt"
    (finding,) = check_config(_serve_config(str(weights[0]), str(missing)), {}, gpus=1)
    assert finding.cause == f"{missing} does not exist"
    assert f"-o {missing} https://github.com/ultralytics/assets/releases/download/" in finding.fix
    assert finding.fix.endswith("/yolo11m-seg.pt`, or point yolo.model at a .pt you have")


def test_a_hub_id_needs_a_pinned_revision(weights: tuple[Path, Path]) -> None:
    config = _serve_config("briaai/RMBG-2.0", str(weights[1]))
    (finding,) = check_config(config, {}, gpus=1)
    assert "pinned 40-hex revision" in finding.cause and "None" in finding.cause


def test_a_pinned_hub_id_offline_and_not_cached_names_the_download(
    weights: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "_hf_cached", lambda repo, revision: False)
    config = _serve_config("briaai/RMBG-2.0", str(weights[1]))
    config["applications"][0]["args"]["rmbg"]["revision"] = HUB_REVISION
    (finding,) = check_config(config, {}, gpus=1)  # serve_config sets HF_HUB_OFFLINE=1
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE=1" in finding.cause
    assert f"`hf download briaai/RMBG-2.0 --revision {HUB_REVISION}`" in finding.fix


def test_a_pinned_hub_id_online_needs_a_token_unless_cached(
    weights: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "_hf_token", lambda: None)
    config = _serve_config("briaai/RMBG-2.0", str(weights[1]))
    app = config["applications"][0]
    app["args"]["rmbg"]["revision"] = HUB_REVISION
    app["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] = "0"
    monkeypatch.setattr(preflight, "_hf_cached", lambda repo, revision: False)
    (finding,) = check_config(config, {}, gpus=1)
    assert finding.cause == "briaai/RMBG-2.0 is gated and no Hugging Face token is set"
    assert "HF_TOKEN" in finding.fix
    assert check_config(config, {"HF_TOKEN": "hf_x"}, gpus=1) == []
    monkeypatch.setattr(preflight, "_hf_cached", lambda repo, revision: True)
    assert check_config(config, {}, gpus=1) == []


def test_rmbg_without_remote_code_allowed_is_refused(weights: tuple[Path, Path]) -> None:
    config = _serve_config(str(weights[0]), str(weights[1]))
    del config["applications"][0]["runtime_env"]["env_vars"]["RMBG_TRUST_REMOTE_CODE"]
    (finding,) = check_config(config, {}, gpus=1)
    assert "remote code is not allowed" in finding.cause
    assert "RMBG_TRUST_REMOTE_CODE=true" in finding.fix


def test_bad_arguments_are_named() -> None:
    config = _serve_config("standin:tiny-birefnet", "standin:yolo11n-seg")
    config["applications"][0]["args"]["rmbg"]["colour"] = "blue"
    (finding,) = check_config(config, {}, gpus=1)
    assert "args.rmbg.colour" in finding.cause


def test_gpus_are_counted_by_torch_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert count_gpus() == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert count_gpus() == 0


def test_no_gpu_fails_in_seconds_with_exit_code_2(
    tmp_path: Path, weights: tuple[Path, Path]
) -> None:
    """The command ``make serve`` runs, on this machine (no GPU): exit 2, the cause on stderr."""
    config_file = tmp_path / "serve.yaml"
    config = _serve_config(str(weights[0]), str(tmp_path / "nowhere" / "yolo11m-seg.pt"))
    config_file.write_text(yaml.safe_dump(copy.deepcopy(config)))
    run = subprocess.run(
        [sys.executable, "-m", "segmentation_service.preflight", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run.returncode == 2
    assert "GPU: the deployments need 1 GPU(s)" in run.stderr
    assert "make demo" in run.stderr
    assert f"{tmp_path / 'nowhere' / 'yolo11m-seg.pt'} does not exist" in run.stderr


def test_the_shipped_config_without_its_api_key_says_how_to_set_it(
    weights: tuple[Path, Path],
) -> None:
    config = _serve_config(str(weights[0]), str(weights[1]))
    shipped = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    variable = shipped["applications"][0]["args"]["router"]["api_key_env"]
    config["applications"][0]["args"]["router"] = {"api_key_env": variable}
    for environ in ({}, {variable: "  "}):
        (finding,) = check_config(config, environ, gpus=1)
        assert finding.subject.endswith("API key") and variable in finding.cause
        assert f"export {variable}=" in finding.fix and "api_key_env to null" in finding.fix
    assert check_config(config, {variable: "k3y"}, gpus=1) == []
