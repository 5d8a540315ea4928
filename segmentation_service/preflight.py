"""Check a Serve config against this machine before Ray starts: GPUs and model weights.

Without it, ``serve run serve_config.yaml`` on a machine with no GPU prints Ray autoscaler
errors about ``{'GPU': 0.5}`` for minutes, and missing weights surface as a replica
traceback after Ray, the proxy and a model load have started. This reads the config only
(no Ray, no model load), answers within seconds, and names the cause and the fix::

    python -m segmentation_service.preflight serve_config.yaml   # exit 0 ok, 2 not runnable

What it checks, for each application built by ``segmentation_service.app:build_app``:

- the arguments validate (the same models ``build_app`` uses) and so do the settings of the
  application's ``runtime_env.env_vars`` over this process's environment;
- the GPUs the deployments ask for exist: each replica at start (``num_replicas``, or
  ``autoscaling_config`` ``initial_replicas``/``min_replicas``) needs its ``num_gpus`` on one
  card, packed the way Ray packs fractional requests;
- each model source resolves: a local RMBG-2.0 directory holds ``config.json``, its model
  code and ``model.safetensors``; a hub id has a pinned 40-hex revision and a token or a
  cached snapshot; a YOLO ``.pt`` file exists; ``standin:`` sources need nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from segmentation.config import DEFAULT_RMBG_MODEL, SettingsError, load_settings, parse_bool
from segmentation_service.config import AppArgs

BUILDER = "segmentation_service.app:build_app"
EXIT_NOT_RUNNABLE = 2
STANDIN_PREFIX = "standin:"
WEIGHTS_FILE = "model.safetensors"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: Where Ultralytics publishes its checkpoints (the release the installed version downloads).
YOLO_ASSETS = "https://github.com/ultralytics/assets/releases/download/v8.4.0"
_DEMO_FIX = (
    "run `make demo` (the same application on the CPU with stand-in models), or run this "
    "config on a machine with NVIDIA GPUs and drivers"
)


@dataclass(frozen=True)
class Finding:
    """One thing the config needs that this machine lacks, and how to provide it."""

    subject: str
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.cause}\n  fix: {self.fix}"


def count_gpus() -> int:
    """CUDA devices this process can use: torch's count, else ``nvidia-smi -L``'s, else 0."""
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def cards_needed(requests: Sequence[float]) -> int:
    """Cards that hold these per-replica GPU requests, packed first-fit largest first.

    Ray places a fractional request (< 1) on a single card beside others; a request of 1 or
    more takes that many whole cards.
    """
    whole = sum(math.ceil(r) for r in requests if r >= 1)
    free: list[float] = []
    for request in sorted((r for r in requests if 0 < r < 1), reverse=True):
        for i, left in enumerate(free):
            if left + 1e-9 >= request:
                free[i] = left - request
                break
        else:
            free.append(1.0 - request)
    return whole + len(free)


def _starting_replicas(deployment: Mapping[str, Any]) -> int:
    autoscaling = deployment.get("autoscaling_config")
    if isinstance(autoscaling, Mapping):
        initial = autoscaling.get("initial_replicas")
        return int(initial if initial is not None else autoscaling.get("min_replicas", 1))
    replicas = deployment.get("num_replicas", 1)
    return 1 if replicas == "auto" else int(replicas)


def gpu_requests(app: Mapping[str, Any]) -> dict[str, list[float]]:
    """Deployment name -> the ``num_gpus`` of each replica it starts with (GPU users only)."""
    requests = {}
    for deployment in app.get("deployments") or []:
        gpus = float((deployment.get("ray_actor_options") or {}).get("num_gpus", 0) or 0)
        if gpus > 0:
            requests[deployment["name"]] = [gpus] * _starting_replicas(deployment)
    return requests


def check_gpus(apps: Sequence[Mapping[str, Any]], available: int) -> list[Finding]:
    """A finding when the applications' replicas need more cards than ``available``."""
    per_deployment: dict[str, list[float]] = {}
    for app in apps:
        for name, requests in gpu_requests(app).items():
            per_deployment[f"{app.get('name', 'app')}/{name}"] = requests
    needed = cards_needed([r for requests in per_deployment.values() for r in requests])
    if needed <= available:
        return []
    asked = ", ".join(f"{name} {len(r)} x num_gpus {r[0]:g}" for name, r in per_deployment.items())
    have = "no GPU" if available == 0 else f"{available} GPU(s)"
    cause = (
        f"the deployments need {needed} GPU(s) ({asked}) and this machine has {have} "
        "(torch.cuda / nvidia-smi); Ray would wait for them forever, logging autoscaler errors"
    )
    fix = _DEMO_FIX if available == 0 else "lower num_gpus or the replica counts, or add GPUs"
    return [Finding("GPU", cause, fix)]


def _hf_offline(environ: Mapping[str, str]) -> bool:
    try:
        return parse_bool(environ.get("HF_HUB_OFFLINE", "0") or "0")
    except ValueError:
        return False


def _hf_cached(repo_id: str, revision: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, WEIGHTS_FILE, revision=revision)
    return isinstance(found, str)


def _hf_token() -> str | None:
    """A token saved by ``hf auth login`` (or in ``HF_TOKEN``), as the hub client finds it."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def check_rmbg(
    source: str,
    revision: str | None,
    *,
    trust_remote_code: bool,
    token: str | None,
    environ: Mapping[str, str],
    need_weights: bool = True,
) -> list[Finding]:
    """Whether the RMBG-2.0 source resolves to a loadable model directory."""
    subject = f"RMBG-2.0 weights ({source})"
    if source.startswith(STANDIN_PREFIX):
        return []
    if not trust_remote_code:
        return [
            Finding(
                subject,
                "RMBG-2.0 runs its own model code (birefnet.py) and remote code is not allowed",
                "set RMBG_TRUST_REMOTE_CODE=true in the application's runtime_env.env_vars "
                "or rmbg.trust_remote_code: true in its args",
            )
        ]
    path = Path(source).expanduser()
    local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if local:
        return _check_rmbg_dir(path, subject, need_weights)
    download = f"hf download {source} --local-dir /models/{source.split('/')[-1]}"
    if revision is None or not _COMMIT.match(revision):
        return [
            Finding(
                subject,
                f"a hub id runs the repository's code, so it needs a pinned 40-hex revision "
                f"(rmbg.revision / RMBG_REVISION is {revision!r})",
                f"set rmbg.revision to a commit of https://huggingface.co/{source}/commits/main, "
                f"or `{download}` and set rmbg.model to that directory",
            )
        ]
    if _hf_cached(source, revision):
        return []
    if _hf_offline(environ):
        return [
            Finding(
                subject,
                f"{source}@{revision} is not in the Hugging Face cache and HF_HUB_OFFLINE=1",
                f"`hf download {source} --revision {revision}` on this machine first, or "
                f"`{download}` and set rmbg.model to that directory",
            )
        ]
    if (token or _hf_token()) is None:
        return [
            Finding(
                subject,
                f"{source} is gated and no Hugging Face token is set",
                f"accept the licence at https://huggingface.co/{source}, then set HF_TOKEN in "
                "runtime_env.env_vars (or `hf auth login`)",
            )
        ]
    return []


def _check_rmbg_dir(path: Path, subject: str, need_weights: bool) -> list[Finding]:
    download = (
        f"accept the licence at https://huggingface.co/{DEFAULT_RMBG_MODEL} and `hf auth login`"
        f" (the model is gated), then `hf download {DEFAULT_RMBG_MODEL} --local-dir {path}`"
    )
    if not path.is_dir():
        return [Finding(subject, f"{path} does not exist", download)]
    config_file = path / "config.json"
    if not config_file.is_file():
        return [Finding(subject, f"{path} has no config.json", download)]
    missing = [WEIGHTS_FILE] if need_weights and not (path / WEIGHTS_FILE).is_file() else []
    try:
        auto_map = json.loads(config_file.read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return [Finding(subject, f"{config_file} is not a JSON object", download)]
    for reference in auto_map.values():
        module = f"{str(reference).rsplit('.', 1)[0]}.py"
        if not (path / module).is_file() and module not in missing:
            missing.append(module)
    if missing:
        return [Finding(subject, f"{path} has no {', '.join(missing)}", download)]
    return []


def check_yolo(source: str, environ: Mapping[str, str]) -> list[Finding]:
    """Whether the YOLO source is a stand-in, an architecture yaml or a ``.pt`` on disk."""
    subject = f"YOLO weights ({source})"
    if source.startswith(STANDIN_PREFIX) or source.endswith((".yaml", ".yml")):
        return []
    path = Path(source).expanduser()
    if path.is_file():
        return []
    name = path.name if path.suffix == ".pt" else f"{path.name}.pt"
    target = path if path.suffix == ".pt" else path.with_suffix(".pt")
    fetch = f"`curl -L --create-dirs -o {target} {YOLO_ASSETS}/{name}`"
    if os.sep not in source and not _hf_offline(environ):
        return []  # a bare name: Ultralytics downloads it on first start
    return [
        Finding(
            subject,
            f"{path} does not exist",
            f"put the .pt file there: {fetch}, or point yolo.model at a .pt you have",
        )
    ]


def check_app(app: Mapping[str, Any], environ: Mapping[str, str]) -> list[Finding]:
    """Model sources and arguments of one application (its GPUs are checked across apps)."""
    name = app.get("name", "app")
    try:
        args = AppArgs.model_validate(app.get("args") or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"args.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return [Finding(f"{name} arguments", problems, "correct them in the config")]
    env = {**environ, **((app.get("runtime_env") or {}).get("env_vars") or {})}
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        return [Finding(f"{name} settings", str(exc), "correct runtime_env.env_vars")]
    rmbg = args.rmbg
    trust = settings.rmbg_trust_remote_code
    findings = check_rmbg(
        rmbg.model or settings.rmbg_model,
        rmbg.revision or settings.rmbg_revision,
        trust_remote_code=trust if rmbg.trust_remote_code is None else rmbg.trust_remote_code,
        token=settings.hf_token,
        environ=env,
        need_weights=rmbg.load_format != "dummy",
    )
    findings += check_yolo(args.yolo.model or settings.yolo_model, env)
    findings += check_api_key(args.router.api_key_env, env, name)
    return findings


def check_api_key(variable: str | None, environ: Mapping[str, str], name: str) -> list[Finding]:
    """The API key variable that ``router.api_key_env`` names must hold a key: the Router
    refuses to start without one (authentication never fails open)."""
    if variable is None or environ.get(variable, "").strip():
        return []
    return [
        Finding(
            f"{name} API key",
            f"router.api_key_env is {variable!r}, but {variable} is "
            f"{'empty' if variable in environ else 'not set'}: the Router would refuse to start",
            f"export {variable}=<a long random key> before starting Ray (see docs/operations.md, "
            "Authentication: not in runtime_env), or set router.api_key_env to null to run "
            "without authentication",
        )
    ]


def check_config(config: Mapping[str, Any], environ: Mapping[str, str], gpus: int) -> list[Finding]:
    """Everything ``config`` needs that a machine with ``gpus`` cards and ``environ`` lacks."""
    apps = [a for a in config.get("applications") or [] if a.get("import_path") == BUILDER]
    findings = check_gpus(apps, gpus)
    for app in apps:
        findings += check_app(app, environ)
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m segmentation_service.preflight CONFIG.yaml", file=sys.stderr)
        return EXIT_NOT_RUNNABLE
    path = Path(argv[0])
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"preflight: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNABLE
    if not isinstance(config, dict):
        print(f"preflight: {path} is not a Serve config (a YAML mapping)", file=sys.stderr)
        return EXIT_NOT_RUNNABLE
    findings = check_config(config, os.environ, count_gpus())
    if not findings:
        print(f"preflight: {path}: GPUs and model weights are in place")
        return 0
    print(f"preflight: {path} cannot run on this machine:\n", file=sys.stderr)
    for finding in findings:
        print(f"{finding}\n", file=sys.stderr)
    return EXIT_NOT_RUNNABLE


if __name__ == "__main__":
    sys.exit(main())
