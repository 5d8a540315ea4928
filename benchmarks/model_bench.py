"""Model-level benchmark: the naive RMBG-2.0 loop vs the segmentors in FP32 and FP16.

Real architectures with random weights: RMBG-2.0 from its published code (a directory with
birefnet.py, BiRefNet_config.py, config.json), YOLO11-seg n and x from Ultralytics' yaml.
Inputs are decoded 1920x1080 RGB frames; each row is the median of timed iterations after
warm-up, with CUDA synchronised around each one.

    python -m benchmarks.model_bench --rmbg-dir third_party/rmbg20 --out model.json
    python -m benchmarks.model_bench --rmbg-fast --out fast.json   # RMBG-2.0 fast path only

``--yolo-only --frames synthetic --yolo standin:product-yolo11n-seg,yolo11n-seg.yaml`` times
YOLO on synthetic product shots with 2-3 products each (``benchmarks.frames``): the trained
stand-in at its training size 320 finds them, the random yolo11n-seg at 640 is the comparison.
Each row then has the ground-truth objects and the instances found per frame, the RLE bytes of
their masks per frame and the postprocess time (NMS, mask decoding, RLE encoding) per frame.
``--device cpu --yolo-frame-size 480x270 --yolo-batches 1,2 --yolo-min-frames 4`` is a smoke
test without a GPU.

``--rmbg-fast`` times the model forward at 1024x1024 on one set of random weights (seed 0):
the published eager code in FP32 and FP16, each step of the fast path alone, all of them,
all of them replayed from CUDA graphs, and (``--compile``) with the Swin blocks, the
decoder, or both compiled, with peak memory and the capture/compile time. The JSON is
rewritten after every row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.checked import release_memory
from benchmarks.frames import FRAME_SOURCES, frame_set
from segmentation.device_decode import decode_jpegs_on
from segmentation.imaging import EncodedImage
from segmentation.models import rmbg20_fast
from segmentation.models.rmbg20_segmentor import IMAGENET_MEAN, IMAGENET_STD, RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.options import DetectOptions

GiB = 2**30


def frames_1080p(count: int) -> list[np.ndarray]:
    from benchmarks.load_test import synthetic_jpeg
    from segmentation.imaging import decode_image

    return [decode_image(synthetic_jpeg(1920, 1080, seed)) for seed in range(count)]


def timed(
    fn: Callable[[], object],
    frames_per_call: int,
    *,
    warmup: int = 2,
    min_frames: int = 32,
    min_iters: int = 3,
) -> dict[str, float | None]:
    cuda = torch.cuda.is_available()  # False only in CPU smoke runs of the YOLO rows
    sync = torch.cuda.synchronize if cuda else lambda: None
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    iterations = max(min_iters, -(-min_frames // frames_per_call))
    for _ in range(iterations):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "batch": frames_per_call,
        "ms_per_frame": round(median * 1000 / frames_per_call, 2),
        "frames_per_s": round(frames_per_call / median, 2),
        "ms_per_call": round(median * 1000, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
        "iterations": iterations,
    }


def naive_rmbg_loop(model: torch.nn.Module, image: Image.Image) -> Image.Image:
    """The per-frame loop most RMBG-2.0 examples use (model card): PIL in, PIL RGBA out."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize((1024, 1024)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    batch = transform(image).unsqueeze(0).to("cuda")
    with torch.no_grad():
        preds = model(batch)[-1].sigmoid().cpu()
    mask = transforms.ToPILImage()(preds[0].squeeze()).resize(image.size)
    out = image.copy()
    out.putalpha(mask)
    return out


def bench_rmbg(rmbg_dir: str, batches: list[int], fp32_batches: list[int]) -> list[dict[str, Any]]:
    frames = frames_1080p(max(batches))
    torch.set_float32_matmul_precision("high")  # TF32, as the model card runs it
    rows = _bench_rmbg_fp32(rmbg_dir, frames, fp32_batches)
    release_memory()
    return rows + _bench_rmbg_fp16(rmbg_dir, frames, batches)


def _bench_rmbg_fp32(
    rmbg_dir: str, frames: list[np.ndarray], batches: list[int]
) -> list[dict[str, Any]]:
    model = RMBG20Segmentor(
        rmbg_dir, device="cuda", use_fp16=False, trust_remote_code=True, load_format="dummy"
    )
    pil = Image.fromarray(frames[0])
    rows: list[dict[str, Any]] = [
        {
            "model": "rmbg-2.0",
            "path": "naive loop (PIL, FP32+TF32, batch 1)",
            **timed(lambda: naive_rmbg_loop(model.model, pil), 1, min_frames=16),
        }
    ]
    print(rows[-1], flush=True)
    for batch in batches:
        rows.append(
            {
                "model": "rmbg-2.0",
                "path": "segmentor FP32+TF32",
                **timed(lambda b=batch: model.predict(frames[:b]), batch),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _bench_rmbg_fp16(
    rmbg_dir: str, frames: list[np.ndarray], batches: list[int]
) -> list[dict[str, Any]]:
    model = RMBG20Segmentor(
        rmbg_dir, device="cuda", use_fp16=True, trust_remote_code=True, load_format="dummy"
    )
    if model.precision.name != "fp16":
        raise RuntimeError(f"FP16 not in use: {model.precision.reason}")
    rows: list[dict[str, Any]] = []
    for batch in batches:
        rows.append(
            {
                "model": "rmbg-2.0",
                "path": "segmentor FP16",
                **timed(lambda b=batch: model.predict(frames[:b]), batch),
            }
        )
        print(rows[-1], flush=True)
        with torch.inference_mode():
            prepared = model.preprocess(frames[:batch])
            rows.append(
                {
                    "model": "rmbg-2.0",
                    "path": "model forward only FP16",
                    **timed(lambda p=prepared: model.forward(p), batch),
                }
            )
        print(rows[-1], flush=True)
    return rows


def _fast(steps: str, graphs: bool) -> tuple[str, bool, Any, bool]:
    """A fast-path row in FP16: its label is its steps joined by ``+`` (and ``+graphs``)."""
    return (steps + ("+graphs" if graphs else ""), True, tuple(steps.split("+")), graphs)


_PATH = "sdpa+windows+decoder+deform"
FAST_VARIANTS: list[tuple[str, bool, Any, bool]] = [
    # label, fp16, optimized steps, CUDA graphs
    ("eager FP32 (TF32)", False, False, False),
    ("eager FP16", True, False, False),
    _fast("sdpa", False),
    _fast("sdpa+windows", False),
    _fast("decoder", False),
    _fast("sdpa+windows+decoder", False),
    _fast(_PATH, False),
    ("deform + graphs", True, ("deform",), True),
    _fast(_PATH, True),
    _fast(f"{_PATH}+resample", False),
    _fast(f"{_PATH}+resample", True),
]
COMPILE_VARIANTS: list[tuple[str, bool, Any, bool]] = [
    _fast(f"{_PATH}+compile", True),
    _fast(f"{_PATH}+compile-decoder", True),
    _fast(f"{_PATH}+resample+compile-decoder", True),
    _fast(f"{_PATH}+compile+compile-decoder", True),
]


def bench_rmbg_fast(
    rmbg_dir: str,
    batches: list[int],
    compile_blocks: bool,
    sink: Callable[[dict[str, Any]], None],
    only: list[str] | None = None,
    input_sizes: tuple[int, ...] = (1024,),
) -> None:
    """Forward-only rows per variant, input size and batch (1024x1024 unless told otherwise);
    ``sink`` gets each row.

    ``only`` keeps the variants of those labels. A compiled row's ``compile_s`` is the first
    forward at each batch: a cold compile, or a load from Inductor's on-disk cache
    (``TORCHINDUCTOR_CACHE_DIR``) when an earlier process compiled the same graphs.
    """
    torch.set_float32_matmul_precision("high")
    variants = FAST_VARIANTS + (COMPILE_VARIANTS if compile_blocks else [])
    if only:
        named = {v[0]: v for v in variants}
        for label in only:  # any other combination of the fast path's steps
            steps = label.removesuffix("+graphs").split("+")
            compiles = set(steps) & set(rmbg20_fast.COMPILED_STEPS)
            if label not in named and compiles and not compile_blocks:
                raise SystemExit(f"--fast-variants {label}: compiles, so needs --compile")
            if label not in named and set(steps) <= set(rmbg20_fast.ALL_STEPS):
                named[label] = _fast("+".join(steps), label.endswith("+graphs"))
        unknown = set(only) - set(named)
        if unknown:
            raise SystemExit(f"unknown --fast-variants {sorted(unknown)}")
        variants = [named[label] for label in only]
    for (label, fp16, steps, graphs), size in itertools.product(variants, input_sizes):
        torch.manual_seed(0)  # the same random weights for every variant
        started = time.perf_counter()
        model = RMBG20Segmentor(
            rmbg_dir,
            device="cuda",
            use_fp16=fp16,
            trust_remote_code=True,
            load_format="dummy",
            optimized=steps,
            input_size=size,
        )
        load_s = time.perf_counter() - started
        generator = torch.Generator(device="cuda").manual_seed(1)
        with torch.inference_mode():  # as every later call: a compiled graph's guards match
            inputs = {
                b: torch.randn((b, 3, size, size), device="cuda", generator=generator).to(
                    model.dtype
                )
                for b in batches
            }
        setup: dict[str, Any] = {"load_s": round(load_s, 1)}
        if {"compile", "compile-decoder"} & set(steps or ()):
            started = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    model.forward(inputs[b])
            torch.cuda.synchronize()
            setup["compile_s"] = round(time.perf_counter() - started, 1)
        if graphs:
            model.batch_buckets = tuple(batches)
            started = time.perf_counter()
            captured = model.capture_graphs(batches)
            setup["capture_s"] = round(time.perf_counter() - started, 1)
            setup["graph_error"] = None if captured else model.graph_error
        for b in batches:
            with torch.inference_mode():
                row = {
                    "model": "rmbg-2.0",
                    "path": label,
                    "input_size": size,
                    "inference_path": model.inference_path,
                    "precision": model.precision.name,
                    **setup,
                    **timed(lambda x=inputs[b], m=model: m.forward(x), b, warmup=3, min_frames=64),
                }
            sink(row)
        del model, inputs
        release_memory()


def profile_rmbg_fast(rmbg_dir: str, batch: int, path: str) -> None:
    """Top CUDA ops of the fast path (eager kernels, no graphs) at ``batch``, as text."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = RMBG20Segmentor(rmbg_dir, device="cuda", trust_remote_code=True, load_format="dummy")
    x = torch.randn((batch, 3, 1024, 1024), device="cuda").half()
    with torch.inference_mode():
        for _ in range(2):
            model.forward(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.forward(x)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    with open(path, "w") as handle:
        handle.write(f"{model.inference_path}, batch {batch}, 1024x1024\n{table}\n")
    print(table, flush=True)


#: Input size of YOLO sources trained at another size than Ultralytics' 640.
YOLO_INPUT_SIZE = {"standin:product-yolo11n-seg": 320}


def yolo_label(name: str) -> str:
    return name.removesuffix(".yaml")


def what_was_found(
    model: YoloSegmentor, frames: list[np.ndarray], options: DetectOptions, runs: int = 3
) -> dict[str, Any]:
    """Instances and RLE bytes per frame of one batch, and its postprocess time per frame
    (NMS, mask decoding at frame size, RLE encoding: what grows with the instances found)."""
    steps: dict[str, float] = {}
    model.predict(frames, options)  # warm
    for _ in range(runs):
        found = model.predict(frames, options, steps)
    instances = [d for frame in found for d in frame.instances]
    count = len(frames)
    return {
        "instances_per_frame": round(len(instances) / count, 2),
        "rle_bytes_per_frame": round(sum(len(d.mask["counts"]) for d in instances) / count, 1),
        "postprocess_ms_per_frame": round(steps["postprocess"] * 1000 / (runs * count), 3),
    }


def bench_yolo(
    names: list[str],
    batches: list[int],
    source: str = "plain",
    device: str = "cuda",
    size: tuple[int, int] = (1920, 1080),
    min_frames: int = 128,
) -> list[dict[str, Any]]:
    from segmentation.imaging import decode_image

    rows: list[dict[str, Any]] = []
    # At most 16 distinct frames (synthetic scenes take seconds each to render), repeated.
    frame_source = frame_set(source, size[0], size[1], count=min(16, max(batches)))
    distinct = frame_source.jpegs
    jpegs = [
        EncodedImage(distinct[i % len(distinct)], size[0], size[1]) for i in range(max(batches))
    ]
    frames = [decode_image(j.data) for j in jpegs]
    about = frame_source.describe()
    options = DetectOptions()
    for name in names:
        imgsz = YOLO_INPUT_SIZE.get(name, 640)
        for fp16 in (False, True):
            model = YoloSegmentor(name, device=device, use_fp16=fp16, imgsz=imgsz)
            label = "FP16" if fp16 else "FP32"
            for batch in batches:
                rows.append(
                    {
                        "model": yolo_label(name),
                        "path": f"segmentor {label}",
                        "input_size": imgsz,
                        "precision": model.precision.name,
                        **about,
                        **what_was_found(model, frames[:batch], options),
                        **timed(
                            lambda m=model, b=batch: m.predict(frames[:b], options),
                            batch,
                            min_frames=min_frames,
                        ),
                    }
                )
                print(rows[-1], flush=True)
            if fp16:
                rows.extend(
                    _yolo_steps_and_jpeg(model, name, frames, jpegs, batches, options, min_frames)
                )
                if model.device.type == "cuda":
                    rows.extend(_yolo_graphs(model, name, frames, max(batches)))
            del model
            release_memory()
    return rows


def _yolo_graphs(
    model: YoloSegmentor, name: str, frames: list[np.ndarray], batch: int
) -> list[dict[str, Any]]:
    """Forward eager vs CUDA-graph replay, alone and beside a busy Python thread (what a
    serving process is: request handling holds the interpreter lock between kernel launches)."""
    import threading

    with torch.inference_mode():
        x = model.preprocess(frames[:batch])[0]
    rows: list[dict[str, Any]] = []

    def measure(label: str) -> None:
        with torch.inference_mode():
            rows.append(
                {
                    "model": name.removesuffix(".yaml"),
                    "path": label,
                    **timed(lambda: model.forward(x), batch, min_frames=8 * batch),
                }
            )
        print(rows[-1], flush=True)

    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(2000))

    for graphs in (False, True):
        if graphs:
            model.batch_buckets = (batch,)
            model.capture_graphs((1080, 1920), (batch,))
        kind = "CUDA graph" if graphs else "eager"
        measure(f"forward FP16 {kind}")
        thread = threading.Thread(target=busy, daemon=True)
        thread.start()
        try:
            measure(f"forward FP16 {kind}, one busy Python thread beside it")
        finally:
            stop.set()
            thread.join()
            stop.clear()
    return rows


def _yolo_steps_and_jpeg(
    model: YoloSegmentor,
    name: str,
    frames: list[np.ndarray],
    jpegs: list[EncodedImage],
    batches: list[int],
    options: DetectOptions,
    min_frames: int = 128,
) -> list[dict[str, Any]]:
    """Where a batch's time goes, and the JPEG path the service uses (nvJPEG, then predict)."""
    rows: list[dict[str, Any]] = []
    batch = max(batches)
    steps: dict[str, float] = {}
    for _ in range(3):
        model.predict(frames[:batch], options, steps)
    steps = {}
    runs = 5
    for _ in range(runs):
        model.predict(frames[:batch], options, steps)
    rows.append(
        {
            "model": name.removesuffix(".yaml"),
            "path": "segmentor FP16, ms per step",
            "batch": batch,
            **{f"{k}_ms": round(v * 1000 / runs, 2) for k, v in steps.items()},
        }
    )
    print(rows[-1], flush=True)
    for label, fn in (
        ("nvJPEG decode only", lambda b: decode_jpegs_on(model.device, jpegs[:b])),
        (
            "segmentor FP16 from JPEG (nvJPEG decode + predict)",
            lambda b: model.predict(decode_jpegs_on(model.device, jpegs[:b]), options),
        ),
    ):
        for b in (1, batch):
            rows.append(
                {
                    "model": name.removesuffix(".yaml"),
                    "path": label,
                    **timed(lambda fn=fn, b=b: fn(b), b, min_frames=min_frames),
                }
            )
            print(rows[-1], flush=True)
    return rows


def environment() -> dict[str, Any]:
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--rmbg-batches", default="1,4,8,16,32")
    parser.add_argument("--rmbg-fp32-batches", default="1,8,16")
    parser.add_argument("--yolo", default="yolo11n-seg.yaml,yolo11x-seg.yaml")
    parser.add_argument("--yolo-batches", default="1,16,64")
    parser.add_argument(
        "--frames",
        choices=FRAME_SOURCES,
        default="plain",
        help="YOLO frames: plain test card, or synthetic product shots with 2-3 objects each",
    )
    parser.add_argument("--yolo-only", action="store_true", help="the YOLO rows only")
    parser.add_argument("--yolo-frame-size", default="1920x1080", help="WxH of the YOLO frames")
    parser.add_argument("--device", default="cuda", help="YOLO rows: cpu for a smoke test")
    parser.add_argument("--yolo-min-frames", type=int, default=128, help="frames timed per row")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rmbg-fast", action="store_true", help="the fast-path rows only")
    parser.add_argument("--fast-batches", default="8,16")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the compiled rows: the Swin blocks, the decoder, and both",
    )
    parser.add_argument(
        "--fast-variants",
        default="",
        help="comma-separated labels of the fast-path rows to run (default: all)",
    )
    parser.add_argument(
        "--input-sizes", default="1024", help="fast-path rows: the model's square input sizes"
    )
    parser.add_argument("--profile", default=None, help="write a fast-path profile here")
    args = parser.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    if args.rmbg_fast:
        fast: dict[str, Any] = {
            "environment": environment(),
            "command": "python -m benchmarks.model_bench " + " ".join(argv or sys.argv[1:]),
            "rmbg_fast": [],
        }

        def sink(row: dict[str, Any]) -> None:
            print(row, flush=True)
            fast["rmbg_fast"].append(row)
            if args.out:
                with open(args.out, "w") as handle:
                    json.dump(fast, handle, indent=2)

        only = [v for v in args.fast_variants.split(",") if v]
        fast["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        bench_rmbg_fast(
            args.rmbg_dir,
            ints(args.fast_batches),
            args.compile,
            sink,
            only,
            tuple(ints(args.input_sizes)),
        )
        if args.profile:
            profile_rmbg_fast(args.rmbg_dir, 8, args.profile)
        return 0
    width, height = (int(v) for v in args.yolo_frame_size.split("x"))
    result: dict[str, Any] = {
        "environment": environment(),
        "command": "python -m benchmarks.model_bench " + " ".join(argv or sys.argv[1:]),
    }
    if not args.yolo_only:
        result["rmbg"] = bench_rmbg(
            args.rmbg_dir, ints(args.rmbg_batches), ints(args.rmbg_fp32_batches)
        )
    result["yolo"] = bench_yolo(
        args.yolo.split(","),
        ints(args.yolo_batches),
        args.frames,
        args.device,
        (width, height),
        args.yolo_min_frames,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
