"""RMBG-2.0's postprocess of one batch: outputs copied frame by frame against in one go.

The postprocess resizes each matte to its frame, composes the cutout on the device and copies
it to the host. Frame by frame (``tensor.cpu()`` of each 8.3 MB RGBA frame) the copies wait
for the device each time and go through pageable memory; the batch path
(:func:`segmentation.transfer.host_arrays`) copies them all into one pinned buffer and waits
once. This times both on the same logits and frames and checks that they give the same
pixels::

    python -m benchmarks.cutout_copy --batch 16 --out cutout-copy.json

With ``--model-dir`` (the published RMBG-2.0 code; random weights, FP16, the default fast
path under CUDA graphs) it also runs whole batches of 1080p frames already on the device
(as nvJPEG leaves them) to RGBA cutouts on the host, one after another as a replica's GPU
thread does: each batch's copy waited for before the next starts (``predict_outputs``), or
left to run beside the next batch and waited for after it was queued
(``predict_outputs_later``, what the replica does). Frames/s of both, and whether they gave
the same pixels::

    python -m benchmarks.cutout_copy --batch 16 --model-dir third_party/rmbg20 --batches 12
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.checked import finish, median_ms
from segmentation.compose import compose_on_device
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.options import CutoutOptions


def frame_by_frame(
    logits: torch.Tensor, frames: list[torch.Tensor], options: CutoutOptions
) -> list[np.ndarray]:
    """The postprocess as it was: each frame's cutout composed, then copied on its own."""
    probs = logits.float().sigmoid_()
    out = []
    for index, rgb in enumerate(frames):
        alpha = F.interpolate(
            probs[index : index + 1], size=rgb.shape[1:], mode="bilinear", align_corners=False
        )
        matte = alpha.mul_(255.0).round_().to(torch.uint8)[0, 0]
        item = compose_on_device(rgb, matte, options)
        out.append(item.on_host(*(t.cpu().numpy() for t in item.tensors())).pixels)
    return out


def pipelined(
    rmbg_dir: str, batch: int, frames: list[torch.Tensor], batches: int
) -> dict[str, Any]:
    """Frames/s of ``batches`` batches with each copy waited for, then overlapped."""
    segmentor = RMBG20Segmentor(
        rmbg_dir, device=frames[0].device, trust_remote_code=True, load_format="dummy"
    )
    segmentor.batch_buckets = (batch,)
    captured = segmentor.capture_graphs((batch,))
    options: list[CutoutOptions | None] = [CutoutOptions()] * batch

    def waited() -> list[Any]:
        outputs: list[Any] = []
        for _ in range(batches):
            outputs = segmentor.predict_outputs(frames, options)
        return outputs

    def overlapped() -> list[Any]:
        before = None
        for _ in range(batches):
            arriving = segmentor.predict_outputs_later(frames, options)
            if before is not None:
                before.result()
            before = arriving
        assert before is not None
        return before.result()

    rows: dict[str, Any] = {"graphs": captured, "path": segmentor.inference_path}
    last: dict[str, list[Any]] = {}
    for name, run in (("copy waited", waited), ("copy overlapped", overlapped)):
        ms = median_ms(functools.partial(_kept, last, name, run), segmentor.device, 3)
        rows[name] = {
            "ms_per_batch": round(ms / batches, 2),
            "frames_per_s": round(batch * batches / ms * 1e3, 2),
        }
    rows["same_pixels"] = all(
        np.array_equal(a.pixels, b.pixels)
        for a, b in zip(last["copy waited"], last["copy overlapped"], strict=True)
    )
    return rows


def _kept(last: dict[str, list[Any]], name: str, run: Callable[[], list[Any]]) -> None:
    last[name] = run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frame-size", default="1920x1080", help="WxH")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", default=None, help="published RMBG-2.0 code (CUDA)")
    parser.add_argument("--batches", type=int, default=12, help="batches a pipelined run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width, height = (int(v) for v in args.frame_size.split("x"))
    generator = torch.Generator(device=device).manual_seed(0)
    # FP16, as the model gives them (``.float()`` then makes the copy that sigmoid_ works on)
    logits = torch.randn((args.batch, 1, 1024, 1024), device=device, generator=generator) * 4
    logits = logits.half()
    frames = [
        torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device=device)
        for _ in range(args.batch)
    ]
    sizes = [(height, width)] * args.batch
    options = CutoutOptions()
    segmentor = object.__new__(RMBG20Segmentor)  # postprocess uses no model state

    def batch() -> list[Any]:
        return segmentor.postprocess(logits, sizes, frames, [options] * args.batch)

    same = all(
        np.array_equal(a.pixels, b)
        for a, b in zip(batch(), frame_by_frame(logits, frames, options), strict=True)
    )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "frame_size": [width, height],
        "output_mb_per_frame": round(height * width * 4 / 1e6, 2),
        "ms": {
            "frame by frame (.cpu() each)": round(
                median_ms(lambda: frame_by_frame(logits, frames, options), device, args.runs), 2
            ),
            "batch (one pinned copy)": round(median_ms(batch, device, args.runs), 2),
        },
        "same_pixels": same,
    }
    if args.model_dir is not None:
        result["pipelined"] = pipelined(args.model_dir, args.batch, frames, args.batches)
        same = same and result["pipelined"]["same_pixels"]
    return finish(result, args.out, same)


if __name__ == "__main__":
    raise SystemExit(main())
