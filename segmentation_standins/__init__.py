"""Small stand-in checkpoints the project makes itself, for tests and the offline CPU demo.

Real weights cannot be downloaded on every machine (RMBG-2.0 is gated; CI and the GPU machine
are offline). Stand-ins have the real interfaces and hazards but random, seeded weights, so
their outputs are meaningless; they are always reported as stand-ins in ``/v1/models`` and in
the log. A stand-in is named ``standin:<name>`` wherever a model source is accepted.

- ``standin:tiny-birefnet``: a remote-code model directory in the RMBG-2.0 format (see
  ``tiny_birefnet/birefnet.py``) with ``model.safetensors``, loaded through the real loader.
- ``standin:yolo11n-seg``: a YOLO11n-seg checkpoint (``.pt``) built from Ultralytics' own yaml,
  with COCO class names.

Two more are trained (``python -m segmentation_standins.train``) on the seeded synthetic
product shots of :mod:`segmentation_standins.synthetic`, so they see: real cutouts and real
instances on such frames (and only there). Their weights are committed under ``weights/``
with their sha256 in ``weights/manifest.json``; a file whose hash differs is refused.

- ``standin:product-birefnet``: a small U-Net with a shifted-window attention bottleneck in the
  RMBG-2.0 remote-code format (``product_birefnet/birefnet.py``), the same hazards as the real
  one, trained on the synthetic mattes.
- ``standin:product-yolo11n-seg``: the real YOLO11n-seg architecture trained on the synthetic
  instances (classes bottle, box, shoe, mug).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PREFIX = "standin:"
RMBG_STANDIN = "standin:tiny-birefnet"
YOLO_STANDIN = "standin:yolo11n-seg"
PRODUCT_RMBG = "standin:product-birefnet"
PRODUCT_YOLO = "standin:product-yolo11n-seg"
#: Stand-ins with trained weights (the others have random ones).
TRAINED = (PRODUCT_RMBG, PRODUCT_YOLO)
_SEED = 1234
_CODE_DIR = Path(__file__).parent / "tiny_birefnet"
PRODUCT_CODE_DIR = Path(__file__).parent / "product_birefnet"
WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
_CONFIG = {
    "architectures": ["BiRefNet"],
    "auto_map": {
        "AutoConfig": "BiRefNet_config.BiRefNetConfig",
        "AutoModelForImageSegmentation": "birefnet.BiRefNet",
    },
    "bb_pretrained": False,
}


def is_standin(source: str) -> bool:
    return source.startswith(PREFIX)


def describe(source: str) -> str | None:
    """What a stand-in's weights are, for ``/v1/models`` and the log (None: not a stand-in)."""
    if not is_standin(source):
        return None
    if is_trained(source):
        return "trained on synthetic product shots: real answers on such scenes only"
    return "random weights: outputs are meaningless"


def is_trained(source: str) -> bool:
    """True for the stand-ins trained on synthetic product shots (not random weights)."""
    return source in TRAINED


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_weights(source: str) -> Path:
    """The committed weights file of a trained stand-in, after checking its sha256 against
    ``weights/manifest.json`` (a truncated or replaced file is an error, never loaded)."""
    from segmentation.errors import ModelLoadError

    entries = json.loads(MANIFEST.read_text())
    entry = entries.get(source)
    if entry is None:
        raise ModelLoadError(f"{source}: no entry in {MANIFEST}; known: {', '.join(entries)}")
    path = WEIGHTS_DIR / entry["file"]
    if not path.is_file():
        raise ModelLoadError(f"{source}: weights file {path} is missing")
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise ModelLoadError(
            f"{source}: {path} has sha256 {actual}, expected {entry['sha256']} "
            f"({MANIFEST.name}); the file is corrupt or was replaced. Restore it from git "
            "(git LFS pointers must be pulled) or retrain with the command in weights/README.md"
        )
    return path


def cache_dir() -> Path:
    """Where stand-ins go: ``$PRODUCT_SEGMENTOR_CACHE``, default ~/.cache/product-segmentor."""
    root = os.environ.get("PRODUCT_SEGMENTOR_CACHE") or Path.home() / ".cache" / "product-segmentor"
    return Path(root) / "standins"


def materialize(source: str, root: Path | None = None) -> Path:
    """Build the stand-in named ``source`` once and return its path (directory or ``.pt``)."""
    if source == PRODUCT_YOLO:
        return trained_weights(source)
    root = root or cache_dir()
    builders = {
        RMBG_STANDIN: _build_tiny_birefnet,
        YOLO_STANDIN: _build_yolo,
        PRODUCT_RMBG: _build_product_birefnet,
    }
    if source not in builders:
        known = [*builders, PRODUCT_YOLO]
        raise ValueError(f"unknown stand-in {source!r}; known: {', '.join(known)}")
    name = source[len(PREFIX) :]
    target = root / (name + (".pt" if source == YOLO_STANDIN else ""))
    if source == PRODUCT_RMBG:
        weights = trained_weights(source)  # checked on every load, cached copy or not
        cached = target / "model.safetensors"
        if cached.is_file() and sha256(cached) == sha256(weights):
            return target
        shutil.rmtree(target, ignore_errors=True)
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    kind = "trained on synthetic product shots" if is_trained(source) else "random weights"
    logger.warning("building stand-in %s at %s (%s, not a real model)", source, target, kind)
    # Build in a temporary sibling and rename, so concurrent replicas never see half a stand-in.
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        built = builders[source](Path(tmp))
        try:
            os.replace(built, target)
        except OSError:
            if not target.exists():
                raise
    return target


def _build_tiny_birefnet(workdir: Path) -> Path:
    from safetensors.torch import save_file

    from segmentation.models.rmbg20_loader import build_model

    model_dir = workdir / "tiny-birefnet"
    model_dir.mkdir()
    for name in ("birefnet.py", "BiRefNet_config.py"):
        shutil.copy(_CODE_DIR / name, model_dir / name)
    (model_dir / "config.json").write_text(json.dumps(_CONFIG, indent=2))
    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        model = build_model(model_dir, load_weights=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"))
    return model_dir


def _build_product_birefnet(workdir: Path) -> Path:
    model_dir = workdir / "product-birefnet"
    write_product_birefnet_code(model_dir)
    shutil.copy(trained_weights(PRODUCT_RMBG), model_dir / "model.safetensors")
    return model_dir


def write_product_birefnet_code(model_dir: Path) -> None:
    """The remote code and config.json of ``standin:product-birefnet`` (no weights)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("birefnet.py", "BiRefNet_config.py"):
        shutil.copy(PRODUCT_CODE_DIR / name, model_dir / name)
    (model_dir / "config.json").write_text(json.dumps(_CONFIG, indent=2))


def _build_yolo(workdir: Path) -> Path:
    from ultralytics import YOLO
    from ultralytics.utils import YAML
    from ultralytics.utils.checks import check_yaml

    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        model: Any = YOLO("yolo11n-seg.yaml")
        # Ultralytics initialises class biases for ~0.01 scores, so a random model finds nothing.
        # Make the coarsest level see class 0 at about the default conf threshold with wide
        # boxes (NMS then keeps a few), so the stand-in returns some (meaningless) objects.
        head = model.model.model[-1]
        for level, branch in enumerate(head.cv3):
            torch.nn.init.constant_(branch[-1].bias, -6.0 if level < len(head.cv3) - 1 else -9.0)
        head.cv3[-1][-1].bias.data[0] = -1.0
        distances = head.cv2[-1][-1].bias.data.view(4, -1)
        distances.zero_()
        distances[:, 12] = 8.0
    names = YAML.load(check_yaml("coco.yaml"))["names"]
    model.model.names = names
    path = workdir / "yolo11n-seg.pt"
    model.save(str(path))
    return path
