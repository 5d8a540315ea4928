"""The frames the benchmarks send: a plain test card, or synthetic product shots with objects.

``plain`` is :func:`benchmarks.load_test.synthetic_jpeg`: one red ellipse on a noisy light
background. Nothing in it looks like an object to YOLO, so with it every YOLO run measured
an empty answer: no masks decoded, no RLE encoded, nothing for ``/v1/products`` to cut out.

``synthetic`` renders scenes of :mod:`segmentation_standins.synthetic` (bottles, boxes, shoes,
mugs with exact ground truth) at the benchmark's frame size, keeping only scenes with at least
``min_objects`` products, so every frame carries several objects; the stand-in
``standin:product-yolo11n-seg`` was trained on such scenes and finds them. The mean
ground-truth objects per frame is reported beside what the model found.

Rendering is numpy on the CPU, about 1-3 s for a 1080p scene, so scenes are rendered once
per process in parallel (one worker per core) and cached; the load processes of
``benchmarks.fleet`` read the parent's JPEGs from a directory instead of rendering again.
"""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

FRAME_SOURCES = ("plain", "synthetic")
#: Scene stream of the benchmarks: apart from training (0), validation (1) and tests (1000+).
SYNTHETIC_SEED = 5000
JPEG_QUALITY = 90


@dataclass(frozen=True)
class FrameSet:
    """JPEG frames to send and, for synthetic scenes, their ground-truth object counts."""

    source: str
    width: int
    height: int
    jpegs: tuple[bytes, ...]
    objects: tuple[int, ...] | None  # ground-truth products per frame; None for ``plain``

    @property
    def mean_objects(self) -> float | None:
        """Mean ground-truth objects per frame, None where there is no ground truth."""
        if self.objects is None:
            return None
        return round(sum(self.objects) / max(1, len(self.objects)), 2)

    def describe(self) -> dict[str, object]:
        """What a report says about its frames."""
        return {
            "frames": self.source,
            "distinct_frames": len(self.jpegs),
            "gt_objects_per_frame": self.mean_objects,
        }


def _render(args: tuple[int, int, int]) -> tuple[int, bytes]:
    """Scene ``index`` as (objects, JPEG bytes); top-level so worker processes can run it."""
    from PIL import Image

    from segmentation_standins import synthetic

    index, width, height = args
    scene = synthetic.scene(SYNTHETIC_SEED, index, width, height)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return len(scene.masks), buffer.getvalue()


@functools.lru_cache(maxsize=8)
def frame_set(
    source: str, width: int, height: int, count: int = 8, min_objects: int = 2
) -> FrameSet:
    """``count`` distinct frames of ``source`` at ``width`` x ``height``, JPEG-encoded."""
    if source == "plain":
        from benchmarks.load_test import synthetic_jpeg

        jpegs = tuple(synthetic_jpeg(width, height, seed) for seed in range(count))
        return FrameSet(source, width, height, jpegs, None)
    if source != "synthetic":
        raise ValueError(f"unknown frame source {source!r}; known: {', '.join(FRAME_SOURCES)}")
    workers = max(1, min(count, os.cpu_count() or 1))
    kept: list[tuple[int, bytes]] = []
    start = 0
    # About 30% of scenes hold one product: render in rounds until ``count`` have enough.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        while len(kept) < count:
            chunk = max(workers, count - len(kept))
            jobs = [(i, width, height) for i in range(start, start + chunk)]
            start += chunk
            kept.extend(r for r in pool.map(_render, jobs) if r[0] >= min_objects)
            if start > 20 * count:
                raise RuntimeError(f"fewer than {count} scenes with {min_objects}+ objects")
    kept = kept[:count]
    return FrameSet(source, width, height, tuple(j for _, j in kept), tuple(n for n, _ in kept))


def write_frames(frames: FrameSet, directory: Path) -> None:
    """The JPEGs as ``directory/000.jpg, 001.jpg, ...`` for :func:`read_frames`."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, jpeg in enumerate(frames.jpegs):
        (directory / f"{index:03d}.jpg").write_bytes(jpeg)


def read_frames(directory: Path) -> list[bytes]:
    """The JPEGs :func:`write_frames` wrote, in order."""
    jpegs = [path.read_bytes() for path in sorted(directory.glob("*.jpg"))]
    if not jpegs:
        raise FileNotFoundError(f"no .jpg frames in {directory}")
    return jpegs
