"""Shared fixtures: one stand-in cache per test session, offline hubs, image factories."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from segmentation.models.rmbg20_segmentor import RMBG20Segmentor

# Offline and quiet before any test imports transformers, huggingface_hub or ultralytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The published RMBG-2.0 architecture (birefnet.py, BiRefNet_config.py, config.json), brought
#: in by hand; never committed. Tests that need it skip when it is absent.
RMBG_ARCH_DIR = Path(os.environ.get("RMBG_ARCH_DIR", REPO_ROOT / "third_party" / "rmbg20"))


def published_rmbg(device: str = "cpu", **options: Any) -> RMBG20Segmentor:
    """The published RMBG-2.0 architecture (:data:`RMBG_ARCH_DIR`) with random weights on
    ``device``, through the project's loader; ``options`` go to ``RMBG20Segmentor``."""
    from segmentation.models.rmbg20_segmentor import RMBG20Segmentor

    return RMBG20Segmentor(
        str(RMBG_ARCH_DIR), device=device, trust_remote_code=True, load_format="dummy", **options
    )


@pytest.fixture(scope="session", autouse=True)
def standin_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """All stand-ins of a test run are built once, in a directory of their own."""
    if "PRODUCT_SEGMENTOR_CACHE" in os.environ:
        yield Path(os.environ["PRODUCT_SEGMENTOR_CACHE"])
        return
    root = tmp_path_factory.mktemp("standin-cache")
    os.environ["PRODUCT_SEGMENTOR_CACHE"] = str(root)
    yield root
    del os.environ["PRODUCT_SEGMENTOR_CACHE"]


def product_frame(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A synthetic product shot: a coloured ellipse on a light, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (width / 4)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 <= 1
    frame = rng.integers(200, 240, size=(height, width, 3), dtype=np.uint8)
    frame[inside] = (180, 40, 30)
    return frame


def encode(frame: np.ndarray, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def write_video(
    path: Path, frames: list[np.ndarray], fps: int = 25, codec: str = "png"
) -> list[np.ndarray]:
    """Write ``frames`` as a video (``png`` in .mov is lossless) and return them as decoded."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb24" if codec == "png" else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def assert_cutout(rgba: np.ndarray, frame: np.ndarray) -> None:
    """``rgba`` is ``frame``'s cutout: its pixels where the alpha is not 0, (0, 0, 0) where it
    is (fully transparent pixels are stored black)."""
    assert rgba.shape == (*frame.shape[:2], 4), rgba.shape
    visible = rgba[..., 3] > 0
    assert visible.any(), "the matte hides every pixel; the comparison would prove nothing"
    assert np.array_equal(rgba[..., :3][visible], frame[visible])
    assert not rgba[..., :3][~visible].any()


def python_json(args: list[str], inductor_dir: Path, **env: str) -> dict[str, Any]:
    """``python ARGS`` in a fresh process with its own Inductor cache; its last line's JSON."""
    done = subprocess.run(
        [sys.executable, *args],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report
