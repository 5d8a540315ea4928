"""Load the published RMBG-2.0 remote code (BiRefNet) on transformers 5.

``from_pretrained`` cannot load it on transformers 5 (the model replaces ``self.config`` with a
plain object and its backbone calls ``.item()`` during ``__init__``, which fails on the meta
device). What works: build from the config on a real device, then load the safetensors state
dict strictly. See MEASUREMENTS.md.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from segmentation.errors import ModelLoadError
from segmentation.models.base import StageClock

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_GATED_HELP = (
    "RMBG-2.0 is gated on the Hugging Face hub and licensed for non-commercial use. Either accept "
    "its licence at https://huggingface.co/briaai/RMBG-2.0 and set HF_TOKEN, or download it once "
    "(`hf download briaai/RMBG-2.0 --local-dir /models/RMBG-2.0`) and set "
    "RMBG_MODEL=/models/RMBG-2.0."
)


def resolve_model_dir(
    source: str,
    *,
    revision: str | None,
    trust_remote_code: bool,
    token: str | None = None,
    need_weights: bool = True,
) -> Path:
    """Return a local directory holding ``config.json``, the model code and (optionally) weights.

    ``source`` is a local directory or a hub repo id; a hub id needs a pinned 40-hex
    ``revision`` because the model runs the repository's own Python code.
    """
    if not trust_remote_code:
        raise ModelLoadError(
            f"{source}: RMBG-2.0 runs its own model code (birefnet.py); set "
            "RMBG_TRUST_REMOTE_CODE=true to allow it"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return _check_dir(path, need_weights)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(
            f"RMBG_MODEL={source!r} is neither an existing directory nor a hub id like "
            f"'briaai/RMBG-2.0'. {_GATED_HELP}"
        )
    if revision is None or not _COMMIT.match(revision):
        raise ModelLoadError(
            f"RMBG_REVISION={revision!r}: a hub id runs remote code, so pin it to a 40-hex commit "
            f"of {source} (its 'Files and versions' history lists them)"
        )
    return _download(source, revision, token, need_weights)


def _download(repo_id: str, revision: str, token: str | None, need_weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["*.py", "*.json"] + ([WEIGHTS_FILE] if need_weights else [])
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id}: access denied. {_GATED_HELP}") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{repo_id} has no revision {revision} (RMBG_REVISION)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}: repository not found or not visible. {_GATED_HELP}"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}@{revision} is not in the local cache and the hub cannot be reached. "
            + _GATED_HELP
        ) from None
    return _check_dir(Path(local), need_weights)


def _check_dir(path: Path, need_weights: bool) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a model directory")
    if need_weights and not (path / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{path} has no {WEIGHTS_FILE}. {_GATED_HELP}")
    return path


def build_model(
    model_dir: Path,
    *,
    load_weights: bool = True,
    device: torch.device | str = "cpu",
    timings: dict[str, float] | None = None,
) -> torch.nn.Module:
    """Build the model from its config on ``device`` and load its weights strictly.

    Built on a GPU, the random initialisation of RMBG-2.0's 220 M parameters (which the
    weights then overwrite) takes milliseconds instead of seconds of one CPU core; where the
    model's code cannot be built there, it is built on the CPU as before. The GPU's context is
    created on a thread while the model's code and its dependencies are imported (the driver
    works without the interpreter lock), and the weights are read straight into GPU memory.
    ``timings``, when given, receives the seconds of each step: ``code`` (importing the
    model's code), ``device`` (waiting for the GPU context after that), ``init`` (building
    the model), ``weights``.
    """
    from transformers import AutoConfig, AutoModelForImageSegmentation

    # Host time per step: waiting for the GPU here would fold the context's creation (on its
    # thread, meanwhile) into the import of the code.
    steps = StageClock(torch.device("cpu"), timings)
    target = torch.device(device)
    context = _create_context(target)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
        _import_model_code(config, model_dir)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: cannot build the model from its code: {exc}") from exc
    steps.lap("code")
    if context is not None:
        context.join()
    steps.lap("device")
    # Random weights are the same in every process (seed 0): two replicas, or a process and
    # the one it is compared with, run one model.
    seeded = _same_random_weights(target) if not load_weights else contextlib.nullcontext()
    from_config = AutoModelForImageSegmentation.from_config
    with seeded:
        model = None
        if target.type != "cpu":
            try:
                with target:
                    model = from_config(config, trust_remote_code=True)
            except Exception as exc:  # the CPU build below reports what is really wrong
                logger.warning(
                    "%s: building on %s failed (%s); building on the CPU", model_dir, target, exc
                )
        if model is None:
            try:
                with torch.device("cpu"):
                    model = from_config(config, trust_remote_code=True)
            except Exception as exc:
                raise ModelLoadError(
                    f"{model_dir}: cannot build the model from its code: {exc}"
                ) from exc
    steps.lap("init")
    if load_weights:
        built_on = next(model.parameters()).device  # the target, or the CPU after a fallback
        load_state_dict_strict(model, model_dir / WEIGHTS_FILE, device=built_on)
    else:
        logger.warning("%s: random weights (load_format=dummy); outputs are meaningless", model_dir)
    steps.lap("weights")
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _same_random_weights(device: torch.device) -> Iterator[None]:
    """Torch's random generators seeded with 0 inside, as they were after."""
    devices = [device.index or 0] if device.type == "cuda" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def _create_context(device: torch.device) -> threading.Thread | None:
    """Start creating ``device``'s CUDA context on a thread (None on other devices). A failure
    is left for the build itself to report."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None

    def create() -> None:
        with contextlib.suppress(Exception):
            torch.empty(1, device=device)

    thread = threading.Thread(target=create, name="cuda-context", daemon=True)
    thread.start()
    return thread


def _import_model_code(config: Any, model_dir: Path) -> None:
    """Import the model's class (its code and every module that code imports) ahead of the
    build, so the two are timed apart; ``from_config`` then finds it imported."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    reference = (getattr(config, "auto_map", None) or {}).get("AutoModelForImageSegmentation")
    if reference:
        get_class_from_dynamic_module(reference, str(model_dir))


def load_state_dict_strict(
    model: torch.nn.Module, path: Path, device: torch.device | str = "cpu"
) -> None:
    """Load safetensors weights into ``model``, read onto ``device`` one tensor at a time (on
    a GPU no second copy of the model is held, only the tensor being copied); any missing or
    unexpected key, or a tensor of another shape, is an error and leaves ``model`` as it was.
    """
    from safetensors import safe_open

    state = model.state_dict()
    with safe_open(str(path), framework="pt", device=str(device)) as weights:
        keys = set(weights.keys())
        missing = [k for k in state if k not in keys]
        unexpected = sorted(keys - state.keys())
        if missing or unexpected:
            raise ModelLoadError(
                f"{path} does not match the model: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
                f"(e.g. {unexpected[:3]})"
            )
        shapes = {k: weights.get_slice(k).get_shape() for k in state}
        wrong = [k for k, shape in shapes.items() if list(shape) != list(state[k].shape)]
        if wrong:
            k = wrong[0]
            raise ModelLoadError(
                f"{path} does not match the model: {len(wrong)} tensors of another shape "
                f"(e.g. {k}: {list(shapes[k])} in the file, {list(state[k].shape)} in the model)"
            )
        with torch.no_grad():
            for key, target in state.items():
                target.copy_(weights.get_tensor(key))


def cast_attention_masks(model: torch.nn.Module) -> int:
    """Make every attention ``mask`` argument follow the dtype of the activations.

    The Swin backbone builds its shifted-window mask in FP32; added to FP16 scores it promotes
    them to FP32 and ``attn @ v`` fails. A forward pre-hook on each module that takes a
    ``mask`` casts it first, which keeps the whole model in FP16. Returns the hooks added.
    """

    def make_hook(position: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            dtype = args[0].dtype
            mask = kwargs.get("mask")
            if isinstance(mask, torch.Tensor) and mask.dtype != dtype:
                kwargs["mask"] = mask.to(dtype)
            elif (
                len(args) > position
                and isinstance(args[position], torch.Tensor)
                and args[position].dtype != dtype
            ):
                args = (*args[:position], args[position].to(dtype), *args[position + 1 :])
            return args, kwargs

        return hook

    count = 0
    for module in model.modules():
        parameters = list(inspect.signature(module.forward).parameters)
        if "mask" in parameters:
            module.register_forward_pre_hook(make_hook(parameters.index("mask")), with_kwargs=True)
            count += 1
    return count
