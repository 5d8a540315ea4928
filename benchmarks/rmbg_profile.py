"""Where RMBG-2.0's forward spends its GPU time, stage by stage and kernel by kernel.

The published model's forward runs its Swin backbone twice (the frame at the input size and
at half of it), concatenates the two, squeezes the deepest features and decodes. This tool
times each of those stages (and each Swin stage inside the backbone) by the GPU time of the
kernels launched inside it, sorts every kernel into a category (matrix products,
convolutions, attention, compiled Triton kernels, normalisation, resampling, gathers,
copies, other elementwise work), and times the whole forward outside the profiler (as
``model_bench`` times its rows), with and without the stage hooks, so that a reader can see
what is left to speed up and what the hooks cost::

    python -m benchmarks.rmbg_profile --rmbg-dir third_party/rmbg20 --batch 16 \\
        --steps sdpa,windows,decoder,deform,resample,compile-decoder --compile-cache DIR \\
        --out profile.json

The forward runs without CUDA graphs (a graph replay hides its kernels from the profiler);
with ``--compile-cache`` a compiled step loads its graphs from the artifact there, as a
replica does. On a CPU the stages get CPU times only (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function

from benchmarks.model_bench import environment, timed
from segmentation.models import rmbg20_fast
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor

#: Kernel categories, the first whose words appear in a kernel's lower-cased name.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("triton (compiled)", ("triton",)),  # Inductor's: named after the operations they fuse
    ("attention", ("fmha", "flash", "attention", "sdpa", "attn")),
    ("convolution", ("conv", "fprop", "implicit", "dgrad", "winograd")),
    ("matrix product", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "splitk")),
    ("normalisation", ("layer_norm", "layernorm", "batch_norm", "batchnorm", "norm")),
    ("resampling", ("upsample", "interpolate", "bilinear")),
    ("gather / scatter", ("index", "gather", "scatter")),
    ("copy / cat", ("copy", "cat", "transpose", "permute", "contiguous")),
    ("reduction", ("reduce", "softmax", "sum", "mean")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise")),
)
STAGE = "stage:"


def category(kernel: str) -> str:
    """The category of a CUDA kernel by its name (``other`` when no word matches)."""
    name = kernel.lower()
    for label, words in CATEGORIES:
        if any(word in name for word in words):
            return label
    return "other"


@contextlib.contextmanager
def stage_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Profiler ranges named ``stage:<part>`` around the model's backbone (one per input
    size it runs at), each Swin stage and the patch embedding inside it, the squeeze block and
    the decoder, by forward hooks on those modules (none inside a compiled region)."""
    open_ranges: list[Any] = []
    scale = {"size": "?"}  # the input size of the backbone pass that runs
    handles = []

    def enter(template: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if module is bb:
                scale["size"] = f"{args[0].shape[-1]}px"
            span = record_function(STAGE + template.format(**scale))
            span.__enter__()
            open_ranges.append(span)

        return hook

    def leave(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    parts: list[tuple[torch.nn.Module, str]] = []
    bb = getattr(model, "bb", None)
    if bb is not None:
        parts.append((bb, "backbone {size}"))
        if getattr(bb, "patch_embed", None) is not None:
            parts.append((bb.patch_embed, "backbone {size} / patch embedding"))
        for i, layer in enumerate(getattr(bb, "layers", ())):
            parts.append((layer, f"backbone {{size}} / Swin stage {i + 1}"))
    for name, label in (("squeeze_module", "squeeze"), ("decoder", "decoder")):
        module = getattr(model, name, None)
        if module is not None:
            parts.append((module, label))
    try:
        for module, label in parts:
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_ranges:  # a forward that raised inside a stage
            open_ranges.pop().__exit__(None, None, None)


def _launched(event: Any, into: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """The kernels the profiler attached to a CPU event and to every event under it, by
    correlation id: nested ops that share an id carry the same kernels, so one op's list is
    kept per id; events with none (the CUDA runtime's calls, whose ids come from another
    counter and can equal an op's) are passed over."""
    if event.kernels and event.id not in into:
        into[event.id] = list(event.kernels)
    for child in event.cpu_children:
        _launched(child, into)
    return into


def summarise(events: Any, frames: int, top: int = 25) -> dict[str, Any]:
    """Per-frame milliseconds by stage (with categories), by category and by kernel, from
    one profiled forward of ``frames`` frames.

    A stage's kernels are those the profiler attached to the ops under its range, each
    correlation id counted once (see :func:`_launched`). The profiler's GPU-side copies of
    the ranges are not kernels. ``attributed_ms_per_frame`` is what the ``forward`` range
    holds: all of ``device_ms_per_frame`` when every kernel was attributed."""
    cpu = torch.autograd.DeviceType.CPU
    kernels = [
        e
        for e in events
        if e.device_type != cpu
        and not e.name.startswith(STAGE)
        and not getattr(e, "is_user_annotation", False)
    ]
    per_frame = 1e-3 / frames  # microseconds of a batch -> milliseconds a frame
    stages: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.device_type != cpu or not event.name.startswith(STAGE):
            continue
        stage = stages.setdefault(
            event.name.removeprefix(STAGE),
            {"calls": 0, "cpu_ms": 0.0, "device_ms": 0.0, "categories": defaultdict(float)},
        )
        stage["calls"] += 1
        stage["cpu_ms"] += event.cpu_time_total * per_frame
        for launched in _launched(event, {}).values():
            for kernel in launched:
                if kernel.name.startswith(STAGE):
                    continue
                ms = kernel.duration * per_frame
                stage["device_ms"] += ms
                stage["categories"][category(kernel.name)] += ms
    by_kernel: dict[str, list[float]] = defaultdict(list)
    for kernel in kernels:
        by_kernel[kernel.name].append(kernel.device_time_total * per_frame)
    by_category: dict[str, float] = defaultdict(float)
    for name, times in by_kernel.items():
        by_category[category(name)] += sum(times)
    total = sum(by_category.values())
    if "forward" in stages:  # what the forward runs outside the named parts
        top_level = [s for n, s in stages.items() if n != "forward" and " / " not in n]
        stages["outside the parts above"] = {
            "calls": 1,
            "cpu_ms": stages["forward"]["cpu_ms"] - sum(s["cpu_ms"] for s in top_level),
            "device_ms": stages["forward"]["device_ms"] - sum(s["device_ms"] for s in top_level),
            "categories": {
                k: v - sum(s["categories"].get(k, 0.0) for s in top_level)
                for k, v in stages["forward"]["categories"].items()
            },
        }
    kernels = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
    rounded = lambda d: {k: round(v, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {
        "device_ms_per_frame": round(total, 3),
        "attributed_ms_per_frame": round(stages["forward"]["device_ms"], 3)
        if "forward" in stages
        else None,
        "stages": {
            name: {
                **s,
                "cpu_ms": round(s["cpu_ms"], 3),
                "device_ms": round(s["device_ms"], 3),
                "categories": rounded(s["categories"]),
            }
            for name, s in stages.items()
        },
        "categories": rounded(by_category),
        "kernels": [
            {
                "name": name[:160],
                "category": category(name),
                "calls": len(times),
                "ms_per_frame": round(sum(times), 3),
                "share": round(sum(times) / total, 4) if total else None,
            }
            for name, times in kernels
        ],
    }


def profile(
    rmbg_dir: str,
    batch: int,
    steps: tuple[str, ...],
    device: str = "cuda",
    input_size: int = 1024,
    compile_cache: str | None = None,
    runs: int = 10,
) -> dict[str, Any]:
    """One model built as a replica builds it (random weights), warmed, timed, profiled."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    started = time.perf_counter()
    model = RMBG20Segmentor(
        rmbg_dir,
        device=device,
        trust_remote_code=True,
        load_format="dummy",
        optimized=steps,
        input_size=input_size,
        compile_cache=compile_cache,
    )
    model.batch_buckets = (batch,)  # a compiled decoder compiles (or loads) for this size
    load_s = time.perf_counter() - started
    generator = torch.Generator(device=model.device).manual_seed(1)
    with torch.inference_mode():
        x = torch.randn(
            (batch, 3, input_size, input_size), device=model.device, generator=generator
        ).to(model.dtype)
        started = time.perf_counter()
        model.forward(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        forward = lambda: model.forward(x)  # noqa: E731
        plain = timed(forward, batch, warmup=1, min_frames=0, min_iters=runs)
        activities = [ProfilerActivity.CPU]
        if x.is_cuda:
            activities.append(ProfilerActivity.CUDA)
        with stage_ranges(model.model):
            with_ranges = timed(forward, batch, warmup=0, min_frames=0, min_iters=runs)
            with torch_profile(activities=activities) as prof:
                with record_function(STAGE + "forward"):
                    model.forward(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
    return {
        "environment": environment(),
        "batch": batch,
        "input_size": input_size,
        "inference_path": model.inference_path,
        "precision": model.precision.name,
        "compile": model.compile_status,
        "load_s": round(load_s, 1),
        "first_forward_s": round(first_s, 1),
        "ms_per_frame": plain["ms_per_frame"],
        "frames_per_s": plain["frames_per_s"],
        "ms_per_frame_with_stage_hooks": with_ranges["ms_per_frame"],
        **summarise(prof.events(), batch),
    }


def render(result: dict[str, Any]) -> str:
    """The profile as Markdown tables: stages, categories, top kernels."""
    total = result["device_ms_per_frame"] or 1.0
    lines = [
        f"{result['inference_path']}, batch {result['batch']}, {result['input_size']} px: "
        f"{result['ms_per_frame']} ms a frame ({result['frames_per_s']} frames/s) unprofiled; "
        f"{result['device_ms_per_frame']} ms of kernels a frame profiled",
        "",
        "| stage | calls | CPU ms/frame | GPU ms/frame | share | largest categories (ms/frame) |",
        "|---|---|---|---|---|---|",
    ]
    for name, stage in result["stages"].items():
        top = ", ".join(f"{k} {v}" for k, v in list(stage["categories"].items())[:4])
        lines.append(
            f"| {name} | {stage['calls']} | {stage['cpu_ms']} | {stage['device_ms']} | "
            f"{stage['device_ms'] / total:.1%} | {top} |"
        )
    lines += ["", "| category | GPU ms/frame | share |", "|---|---|---|"]
    for name, ms in result["categories"].items():
        lines.append(f"| {name} | {ms} | {ms / total:.1%} |")
    lines += ["", "| kernel | category | calls | ms/frame | share |", "|---|---|---|---|---|"]
    for k in result["kernels"]:
        name = k["name"].replace("|", "/")
        lines.append(
            f"| `{name[:90]}` | {k['category']} | {k['calls']} | "
            f"{k['ms_per_frame']} | {k['share']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=1024)
    parser.add_argument(
        "--steps",
        default=",".join(rmbg20_fast.DEFAULT_STEPS),
        help=f"fast-path steps, of {', '.join(rmbg20_fast.ALL_STEPS)} (empty: eager)",
    )
    parser.add_argument("--compile-cache", default=None, help="a compiled artifact directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=10, help="timed forwards, unprofiled")
    parser.add_argument("--out", default=None, help="JSON here, and the tables beside it (.md)")
    args = parser.parse_args(argv)
    steps = tuple(s for s in args.steps.split(",") if s)
    result = profile(
        args.rmbg_dir,
        args.batch,
        steps,
        device=args.device,
        input_size=args.input_size,
        compile_cache=args.compile_cache,
        runs=args.runs,
    )
    result["command"] = "python -m benchmarks.rmbg_profile " + " ".join(argv or sys.argv[1:])
    text = render(result)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
