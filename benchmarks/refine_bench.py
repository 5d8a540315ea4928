"""Edge colours and output formats: what refining and each format cost per frame, and give.

Two parts, each skippable:

- ``refine``: on composites whose foreground, background and soft alpha are known
  (``segmentation_standins.composites``: a blurred body edge and hair-like strands), the mean
  colour error in the soft band (0 < alpha < 1) of the plain cutout and of the refined one
  (``segmentation.refine``), and the time of refinement per frame on the device: one call on a
  batch (``batched_ms_per_frame``) and frame by frame through ``segmentation.compose`` as the
  RMBG-2.0 replica runs it, the copy to the host included (``compose_ms_per_frame``, beside
  the plain cutout's), with the peak device memory of the batched call. Defaults: 1080p at
  batch 16 on CUDA; 480x270 at batch 4 on a CPU.
- ``formats``: per output option (PNG, PNG refined, WebP lossy and lossless, JPEG on white,
  PNG cropped to the subject), the bytes and the CPU time to compose (on this process's
  device) and encode (one codec thread) per frame, on 1080p synthetic product shots whose
  ground-truth matte is quantised as RMBG-2.0's is; each output is decoded back and checked.

    python -m benchmarks.refine_bench --out refine.json            # CUDA when present
    python -m benchmarks.refine_bench --device cpu --skip formats  # refinement only, small
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segmentation.compose import compose
from segmentation.encoders import encode_pixels
from segmentation.options import CutoutOptions
from segmentation.refine import edge_colour_error, estimate_foreground
from segmentation_standins import synthetic
from segmentation_standins.composites import soft_composite


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def refine_part(
    device: torch.device, width: int, height: int, batch: int, repeat: int
) -> dict[str, Any]:
    composites = [soft_composite(seed, width, height) for seed in range(batch)]
    images = torch.stack([torch.from_numpy(c.image).permute(2, 0, 1) for c in composites]).to(
        device
    )
    mattes = torch.stack([torch.from_numpy(c.alpha) for c in composites]).to(device)
    truth = torch.stack([torch.from_numpy(c.foreground).permute(2, 0, 1) for c in composites])
    colour = images.float() / 255
    alpha = mattes.float()[:, None] / 255

    refined = estimate_foreground(colour, alpha)
    plain_error = edge_colour_error(colour.cpu(), truth, alpha.cpu())
    refined_error = edge_colour_error(refined.cpu(), truth, alpha.cpu())
    soft_share = float(((alpha > 0) & (alpha < 1)).float().mean())
    del refined

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    batched = _timed(lambda: estimate_foreground(colour, alpha), device, repeat)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None

    plain_options, refine_options = CutoutOptions(), CutoutOptions(refine=True)

    def each(options: CutoutOptions) -> Callable[[], None]:
        def run() -> None:
            for index in range(batch):
                compose(images[index], mattes[index], options)

        return run

    plain_s = _timed(each(plain_options), device, repeat)
    refine_s = _timed(each(refine_options), device, repeat)
    return {
        "frames": batch,
        "size": [width, height],
        "soft_share": round(soft_share, 3),
        "edge_error_plain": round(plain_error, 4),
        "edge_error_refined": round(refined_error, 4),
        "error_ratio": round(refined_error / plain_error, 3),
        "batched_ms_per_frame": round(batched / batch * 1000, 2),
        "batched_peak_memory_mib": None if peak is None else round(peak / 2**20, 1),
        "compose_ms_per_frame": {
            "plain": round(plain_s / batch * 1000, 2),
            "refined": round(refine_s / batch * 1000, 2),
        },
    }


FORMAT_ROWS: dict[str, CutoutOptions] = {
    "png": CutoutOptions(),
    "png refined": CutoutOptions(refine=True),
    "webp lossy q80": CutoutOptions(format="webp", quality=80),
    "webp lossy q90 refined": CutoutOptions(format="webp", quality=90, refine=True),
    "webp lossless": CutoutOptions(format="webp", lossless=True),
    "jpeg q90 on white": CutoutOptions(format="jpeg", background=(255, 255, 255, 255)),
    "png cropped": CutoutOptions(crop=True),
    "mask png": CutoutOptions(output="mask"),
}


def formats_part(
    device: torch.device, width: int, height: int, scenes: int, repeat: int
) -> list[dict[str, Any]]:
    shots = [synthetic.scene(11 + i, 0, width, height) for i in range(scenes)]
    frames = [torch.from_numpy(s.image).permute(2, 0, 1).to(device) for s in shots]
    mattes = [torch.from_numpy(np.round(s.alpha * 255).astype(np.uint8)).to(device) for s in shots]
    rows = []
    for name, options in FORMAT_ROWS.items():
        compose_s, encode_s, sizes = [], [], []
        for frame, matte in zip(frames, mattes, strict=True):
            composed = compose(frame, matte, options)
            compose_s.append(_timed(partial(compose, frame, matte, options), device, 1))
            data = encode_pixels(composed.pixels, options)
            encode_s.append(
                _timed(partial(encode_pixels, composed.pixels, options), device, repeat)
            )
            sizes.append(len(data))
            image = Image.open(io.BytesIO(data))
            image.load()
            assert image.size == (composed.pixels.shape[1], composed.pixels.shape[0]), name
            if options.format == "png" or options.lossless:
                decoded = np.asarray(
                    image.convert("RGBA" if composed.pixels.shape[2] == 4 else image.mode)
                )
                expected = (
                    composed.pixels if composed.pixels.shape[2] != 1 else composed.pixels[..., 0]
                )
                assert np.array_equal(decoded, expected), f"{name} is not lossless"
        rows.append(
            {
                "row": name,
                "compose_ms": round(statistics.median(compose_s) * 1000, 1),
                "encode_ms": round(statistics.median(encode_s) * 1000, 1),
                "kb_per_frame": round(statistics.median(sizes) / 1000, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--width", type=int, help="refine frames (1920 on CUDA, 480 on CPU)")
    parser.add_argument("--height", type=int, help="refine frames (1080 on CUDA, 270 on CPU)")
    parser.add_argument("--batch", type=int, help="refine batch (16 on CUDA, 4 on CPU)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=2, help="1080p shots of the formats part")
    parser.add_argument("--skip", default="", help="refine, formats or both, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    wanted = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if wanted == "auto" else wanted)
    gpu = device.type == "cuda"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report: dict[str, Any] = {
        "commit": _commit(),
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if "refine" not in skip:
        report["refine"] = refine_part(
            device,
            args.width or (1920 if gpu else 480),
            args.height or (1080 if gpu else 270),
            args.batch or (16 if gpu else 4),
            args.repeat,
        )
        print(json.dumps(report["refine"]), flush=True)
    if "formats" not in skip:
        report["formats"] = {
            "size": [1920, 1080],
            "rows": formats_part(device, 1920, 1080, args.scenes, args.repeat),
        }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
