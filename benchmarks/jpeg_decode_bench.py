"""JPEG decoding next to the model, per decoder, on one GPU: what a batch costs the process.

The YOLO replicas decode their frames with torchvision's nvJPEG call (one batched call on the
device; its Huffman stage runs on the calling thread's CPU), and on a busy four-card host that
call is about a sixth of a YOLO replica's samples (docs/benchmarks.md). nvImageCodec can send
baseline JPEGs to the GPU's hardware JPEG engines (A100, H100, H200) instead. Rows, per decoder
and batch size, on the benchmarks' 1080p frames:

- ``ms_per_batch``: wall time of one decode call, tensors on the device and synchronised;
- ``cpu_ms_per_frame``: CPU time of this process (every thread) per frame;
- ``max_abs`` / ``mean_abs``: how far the pixels are from PIL's (libjpeg) decode.

    python -m benchmarks.jpeg_decode_bench --batches 16,64 --out decode.json

A decoder that cannot run here (nvImageCodec not installed, no hardware engine) gives a row
that says why.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.frames import FRAME_SOURCES, frame_set
from segmentation.device_decode import decode_jpegs_on
from segmentation.imaging import EncodedImage

Decode = Callable[[Sequence[bytes]], list[torch.Tensor]]


def torchvision_decoder(device: torch.device) -> Decode:
    def decode(jpegs: Sequence[bytes]) -> list[torch.Tensor]:
        images = [EncodedImage(data, 0, 0) for data in jpegs]
        return [t.permute(1, 2, 0) for t in decode_jpegs_on(device, images)]

    return decode


def nvimgcodec_decoder(device: torch.device, backend: str, threads: int) -> Decode:
    from nvidia import nvimgcodec

    kind = getattr(nvimgcodec.BackendKind, backend)
    decoder = nvimgcodec.Decoder(
        device_id=device.index or 0, max_num_cpu_threads=threads, backend_kinds=[kind]
    )
    stream = torch.cuda.current_stream(device)

    def decode(jpegs: Sequence[bytes]) -> list[torch.Tensor]:
        images = decoder.decode(list(jpegs), cuda_stream=stream.cuda_stream)
        missing = [i for i, image in enumerate(images) if image is None]
        if missing:
            raise RuntimeError(f"{backend}: frames {missing} not decoded")
        return [torch.as_tensor(image, device=device) for image in images]

    return decode


def reference(jpegs: Sequence[bytes]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]


def measure(decode: Decode, jpegs: Sequence[bytes], iters: int) -> dict[str, Any]:
    for _ in range(2):
        decode(jpegs)
    torch.cuda.synchronize()
    wall, cpu = [], []
    for _ in range(iters):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        decode(jpegs)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return {
        "ms_per_batch": round(1000 * float(np.median(wall)), 2),
        "frames_per_s": round(len(jpegs) / float(np.median(wall)), 1),
        "cpu_ms_per_frame": round(1000 * float(np.median(cpu)) / len(jpegs), 3),
    }


def agreement(decode: Decode, jpegs: Sequence[bytes], expected: list[np.ndarray]) -> dict[str, Any]:
    got = [t.cpu().numpy() for t in decode(jpegs)]
    diffs = [
        np.abs(g.astype(np.int16) - e.astype(np.int16)) for g, e in zip(got, expected, strict=True)
    ]
    return {
        "shape": list(got[0].shape),
        "max_abs": int(max(d.max() for d in diffs)),
        "mean_abs": round(float(np.mean([d.mean() for d in diffs])), 3),
    }


def _nvimgcodec_version() -> str | None:
    """nvImageCodec's installed version, or its module's where it came without metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-nvimgcodec-cu13")
    except PackageNotFoundError:
        try:
            from nvidia import nvimgcodec
        except ImportError:
            return None
        return str(nvimgcodec.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", choices=FRAME_SOURCES, default="synthetic")
    parser.add_argument("--frame-size", default="1920x1080", help="WxH")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="nvImageCodec's CPU threads")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda", 0)
    width, height = (int(v) for v in args.frame_size.split("x"))
    frames = frame_set(args.frames, width, height, 16)
    expected = reference(frames.jpegs)
    builders: dict[str, Callable[[], Decode]] = {
        "torchvision nvJPEG (the replicas' decoder)": lambda: torchvision_decoder(device),
        "nvImageCodec hardware engines": lambda: nvimgcodec_decoder(
            device, "HW_GPU_ONLY", args.threads
        ),
        "nvImageCodec CUDA (hybrid)": lambda: nvimgcodec_decoder(device, "GPU_ONLY", args.threads),
    }
    result: dict[str, Any] = {
        "command": "python -m benchmarks.jpeg_decode_bench " + " ".join(argv or sys.argv[1:]),
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "nvimgcodec": _nvimgcodec_version(),
        "frames": frames.describe(),
    }
    result["rows"] = rows = []
    for name, build in builders.items():
        row: dict[str, Any] = {"decoder": name}
        try:
            decode = build()
            row.update(agreement(decode, frames.jpegs, expected))
            for batch in (int(b) for b in args.batches.split(",")):
                jpegs = [frames.jpegs[i % len(frames.jpegs)] for i in range(batch)]
                row[f"batch_{batch}"] = measure(decode, jpegs, args.iters)
        except Exception as exc:  # a decoder this machine lacks: the row says why
            row["error"] = f"{type(exc).__name__}: {exc}"
        print(row, flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
