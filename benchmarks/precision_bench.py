"""RMBG-2.0 in lower precision: speed, memory and agreement with FP32 of each variant.

For each model (the published architecture with one set of random weights, and the trained
stand-in ``standin:product-birefnet``) and each variant (FP32; FP16; FP16 with the
transformer linear layers in FP8 or INT8, as ``USE_FP8`` / ``USE_INT8`` run them; FP16 at
3/4 and 1/2 of the model's input size, i.e. 768 and 512 for RMBG-2.0), on synthetic product
shots (:mod:`benchmarks.frames`): frames/s through the segmentor (upload, resize, model,
mattes back at frame size), peak GPU memory, the bytes the weights take, and how far the
mattes are from the FP32 ones at the full input size (max and mean absolute difference in
1/255 steps, share of pixels more than 2/255 and 8/255 off). The timed batch is the set of
frames compared. Two variants only the benchmark has, for comparison: INT8 with dynamic INT8
activations (torchao's ``Int8DynamicActivationInt8WeightConfig`` on the same layers), and
FP8's rounding emulated in the model's dtype (per-tensor e4m3 weights and activations, what
``USE_FP8`` computes, on any device: a numerics figure, not a speed one).

    python -m benchmarks.precision_bench --out precision.json --table precision.md
    python -m benchmarks.precision_bench --device cpu --batch 2 --warmup 0 --iters 1 \\
        --out precision-cpu.json --table precision-cpu.md      # a CPU: agreement, CPU speed

A variant that cannot run on the device (FP8 without compute capability 8.9, FP16 on a CPU)
is a row that says why. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.checked import release_memory
from benchmarks.frames import frame_set
from benchmarks.model_bench import GiB, environment, timed
from segmentation.errors import ModelLoadError
from segmentation.imaging import decode_image
from segmentation.models.rmbg20_loader import WEIGHTS_FILE
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.precision import fp16_unsupported_reason
from segmentation.quantize import quantizable_linears, transformer_linears

#: Model label -> input size of its variants at full size (the stand-in was trained at 256).
MODELS = {"published": 1024, "standin": 256}
STANDIN = "standin:product-birefnet"
#: Pixels more than this many 1/255 steps off count in the ``over_*`` shares.
THRESHOLDS = (2, 8)
#: Largest value of float8 e4m3 (torch.finfo(torch.float8_e4m3fn).max).
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Variant:
    """One row per model: what the segmentor is asked for."""

    label: str
    fp16: bool
    linear: str | None = None  # "fp8", "int8" (the settings); "int8-dynamic", "fp8-emulated"
    scale: float = 1.0  # of the model's full input size

    @property
    def setting(self) -> str | None:
        """The ``linear_format`` the segmentor takes (the benchmark-only ones apply later)."""
        return self.linear if self.linear in ("fp8", "int8") else None


VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", fp16=False),
    Variant("fp16", fp16=True),
    Variant("fp16+fp8", fp16=True, linear="fp8"),
    Variant("fp16+int8", fp16=True, linear="int8"),
    Variant("fp16+int8-dynamic (comparison)", fp16=True, linear="int8-dynamic"),
    Variant("fp16+fp8 rounding, emulated", fp16=True, linear="fp8-emulated"),
    Variant("fp16, input 3/4", fp16=True, scale=0.75),
    Variant("fp16, input 1/2", fp16=True, scale=0.5),
)


def alpha_agreement(
    reference: Sequence[np.ndarray], mattes: Sequence[np.ndarray]
) -> dict[str, float]:
    """How far uint8 mattes are from the reference ones of the same frames: max and mean
    absolute difference in 1/255 steps, and the share of pixels more than 2 and 8 steps off."""
    if len(reference) != len(mattes):
        raise ValueError(f"{len(mattes)} mattes for {len(reference)} reference mattes")
    diffs = [
        np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
        for a, b in zip(reference, mattes, strict=True)
    ]
    diff = np.concatenate(diffs)
    result = {"max_diff_255": int(diff.max()), "mean_diff_255": float(diff.mean())}
    for steps in THRESHOLDS:
        result[f"over_{steps}_255"] = float((diff > steps).mean())
    return result


def published_with_random_weights(arch_dir: str | Path, target: Path, seed: int = 0) -> Path:
    """The published architecture in ``target`` with one set of random weights saved as its
    ``model.safetensors``, so every variant loads the same weights through the real loader."""
    from safetensors.torch import save_file

    shutil.copytree(arch_dir, target, dirs_exist_ok=True)
    torch.manual_seed(seed)
    model = RMBG20Segmentor(
        str(target), device="cpu", trust_remote_code=True, load_format="dummy", optimized=False
    )
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, str(target / WEIGHTS_FILE))
    return target


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, quantized ones at their stored size
    (torchao's tensors: their int8/fp8 data plus scales)."""
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        names = getattr(tensor, "tensor_data_names", None)
        if names is None:
            total += tensor.numel() * tensor.element_size()
            continue
        optional = getattr(tensor, "optional_tensor_data_names", ())
        parts = [getattr(tensor, name, None) for name in (*names, *optional)]
        total += sum(p.numel() * p.element_size() for p in parts if p is not None)
    return total


def _layers(model: torch.nn.Module, fmt: str | None = None) -> dict[str, torch.nn.Linear]:
    """The transformer linear layers (:func:`transformer_linears`) by name; with ``fmt``,
    those that format quantizes (:func:`quantizable_linears`)."""
    names = quantizable_linears(model, fmt) if fmt else transformer_linears(model)  # type: ignore[arg-type]
    return {n: cast(torch.nn.Linear, model.get_submodule(n)) for n in names}


def quantized_layers(model: torch.nn.Module, size: int, count_flops: bool) -> dict[str, Any]:
    """How many transformer linear layers there are, their weights, and (``count_flops``)
    their share of the model's FLOPs per frame at ``size`` (torch's FLOP counter)."""
    names = _layers(model)
    weights = sum(layer.weight.numel() for layer in names.values())
    total = sum(p.numel() for p in model.parameters())
    about: dict[str, Any] = {
        "layers": len(names),
        "weights_m": round(weights / 1e6, 2),
        "parameters_m": round(total / 1e6, 2),
        "weight_share": round(weights / total, 3),
    }
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, 3, size, size), device=device, dtype=dtype))
        counts = counter.get_flop_counts()
        flops = sum(counts["Global"].values())
        linear = sum(
            sum(ops.values())
            for key, ops in counts.items()
            if any(key.endswith("." + name) for name in names)
        )
        about.update(
            gflop_per_frame=round(flops / 1e9, 1),
            linear_gflop_per_frame=round(linear / 1e9, 1),
            flop_share=round(linear / flops, 3),
        )
    return about


def int8_dynamic(model: torch.nn.Module) -> None:
    """The transformer linear layers with dynamic INT8 activations and INT8 weights."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    names = set(transformer_linears(model))
    quantize_(
        model,
        Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        filter_fn=lambda module, fqn: fqn in names and isinstance(module, torch.nn.Linear),
    )


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as a per-tensor scaled e4m3 value, back in its own dtype."""
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    rounded = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (rounded.float() * scale).to(x.dtype)


def emulate_fp8(model: torch.nn.Module) -> None:
    """Round the transformer linear layers' weights (once) and inputs (at every call) as
    ``USE_FP8`` does: one e4m3 scale per tensor, the same layers; the products stay in the
    model's dtype."""
    for layer in _layers(model, "fp8").values():
        layer.weight.data = _to_e4m3(layer.weight.data)
        layer.forward = functools.partial(_emulated_linear, layer)  # type: ignore[method-assign]


def _emulated_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(_to_e4m3(x), layer.weight, layer.bias)


def _build(source: str, device: str, variant: Variant, size: int) -> RMBG20Segmentor:
    segmentor = RMBG20Segmentor(
        source,
        device=device,
        use_fp16=variant.fp16,
        trust_remote_code=True,
        input_size=size,
        linear_format=variant.setting,  # type: ignore[arg-type]
    )
    if variant.linear == "int8-dynamic":
        int8_dynamic(segmentor.model)
    elif variant.linear == "fp8-emulated":
        emulate_fp8(segmentor.model)
    return segmentor


def _precision_name(segmentor: RMBG20Segmentor, variant: Variant) -> str:
    name = segmentor.precision.name
    if variant.linear in ("int8-dynamic", "fp8-emulated"):
        name += f"+{variant.linear}-linear"
    return name


def bench_variant(
    source: str,
    variant: Variant,
    size: int,
    frames: list[np.ndarray],
    args: argparse.Namespace,
    reference: list[np.ndarray] | None,
) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    """One row, and the mattes of the timed batch (None when the variant did not run)."""
    row: dict[str, Any] = {"variant": variant.label, "input_size": size, "batch": len(frames)}
    try:
        started = time.perf_counter()
        segmentor = _build(source, args.device, variant, size)
    except (ModelLoadError, ImportError) as exc:  # ImportError: the comparisons need torchao
        return {**row, "status": "cannot run", "reason": str(exc)}, None
    row["load_s"] = round(time.perf_counter() - started, 1)
    try:
        return _measure(segmentor, variant, frames, args, reference, row)
    finally:
        del segmentor
        release_memory()


def _measure(
    segmentor: RMBG20Segmentor,
    variant: Variant,
    frames: list[np.ndarray],
    args: argparse.Namespace,
    reference: list[np.ndarray] | None,
    row: dict[str, Any],
) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    cuda = segmentor.device.type == "cuda"
    if variant.fp16 and segmentor.precision.dtype != torch.float16:
        why = fp16_unsupported_reason(segmentor.device) or segmentor.precision.reason
        if variant.linear is None and variant.scale == 1.0:
            reason = f"no FP16 here ({why}): this row would repeat fp32"
            return {**row, "status": "skipped", "reason": reason}, None
        row["note"] = f"ran in FP32: {why}"
    row["precision"] = _precision_name(segmentor, variant)
    row["weights_mib"] = round(weight_bytes(segmentor.model) / 2**20, 1)
    if cuda:
        row["weights_allocated_gib"] = round(torch.cuda.memory_allocated() / GiB, 3)
    if args.graphs and cuda:
        segmentor.batch_buckets = (len(frames),)
        if not segmentor.capture_graphs((len(frames),)):
            row["graph_error"] = segmentor.graph_error
    row["inference_path"] = segmentor.inference_path
    outputs: list[list[np.ndarray]] = []  # the last call's mattes only (each holds its batch)

    def call() -> None:
        outputs[:] = [segmentor.predict(frames)]

    try:
        row.update(
            timed(
                call,
                len(frames),
                warmup=args.warmup,
                min_frames=len(frames) * args.iters,
                min_iters=args.iters,
            )
        )
    except Exception as exc:  # a kernel this device lacks: the row says so, the others run
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return {**row, "status": "failed", "reason": last}, None
    if not cuda:
        row["peak_gib"] = None  # the CPU allocator keeps no peak
    mattes = outputs[-1]
    if reference is not None:
        row.update(alpha_agreement(reference, mattes))
    row["status"] = "ok"
    return row, mattes


def bench_model(
    label: str,
    source: str,
    args: argparse.Namespace,
    frames: list[np.ndarray],
    sink: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Every variant of one model; the FP32 row at full size is the reference."""
    full = MODELS[label]
    about: dict[str, Any] = {"model": label, "source": source, "full_input_size": full}
    about["weights"] = "random (seed 0)" if label == "published" else "trained stand-in"
    model = RMBG20Segmentor(source, device=args.device, use_fp16=False, trust_remote_code=True)
    about["quantized_layers"] = quantized_layers(model.model, full, args.flops)
    del model
    print(about, flush=True)
    wanted = [v for v in VARIANTS if not args.variants or v.label in args.variants]
    if wanted[0].label != "fp32":
        wanted.insert(0, VARIANTS[0])  # the reference comes first, whatever was asked
    reference: list[np.ndarray] | None = None
    for variant in wanted:
        size = round(full * variant.scale / 64) * 64  # the stand-in needs multiples of 64
        row, mattes = bench_variant(source, variant, size, frames, args, reference)
        if variant.label == "fp32":
            reference = mattes
        sink({"model": label, **row})
    return about


def markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table (speed columns labelled with the device)."""
    device = result["environment"]["device"]
    lines = [
        f"Device: {device}. frames/s and ms/frame are this device's; agreement is against "
        "FP32 at the model's full input size on the same frames.",
        "",
        "| model | variant | precision in use | input | batch | frames/s | ms/frame | peak GiB "
        "| weights MiB | max /255 | mean /255 | > 2/255 | > 8/255 | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row.get("status") != "ok":
            reason = str(row.get("reason", "")).replace("|", "/")
            lines.append(
                f"| {row['model']} | {row['variant']} | - | {row['input_size']} | "
                f"{row['batch']} | - | - | - | - | - | - | - | - | {row['status']}: {reason} |"
            )
            continue
        agreement = (
            [
                str(row["max_diff_255"]),
                f"{row['mean_diff_255']:.4f}",
                f"{row['over_2_255']:.4%}",
                f"{row['over_8_255']:.4%}",
            ]
            if "max_diff_255" in row
            else ["-"] * 4
        )
        peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}"
        note = "; ".join(str(row[k]) for k in ("note", "graph_error") if row.get(k))
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['precision']} | {row['input_size']} | "
            f"{row['batch']} | {row['frames_per_s']:.2f} | {row['ms_per_frame']:.1f} | {peak} | "
            f"{row['weights_mib']:.1f} | {' | '.join(agreement)} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def _version(package: str) -> str | None:
    """The installed version of ``package`` (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The checked-out commit (None outside a git checkout)."""
    import subprocess

    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--models", default="published,standin", help="published, standin")
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20", help="published code")
    parser.add_argument("--batch", type=int, default=8, help="frames per call (and compared)")
    parser.add_argument("--frame-size", default="1280x720", help="WxH of the product shots")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--graphs", action="store_true", help="replay CUDA graphs (CUDA only)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip FLOPs")
    parser.add_argument("--variants", default="", help="comma-separated labels (default: all)")
    parser.add_argument("--out", default=None, help="JSON, rewritten after every row")
    parser.add_argument("--table", default=None, help="markdown table")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - {v.label for v in VARIANTS}
    models = [m for m in args.models.split(",") if m]
    if unknown or set(models) - set(MODELS):
        raise SystemExit(f"unknown variants {sorted(unknown)} or models {models}")
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as the service's FP32 runs
    width, height = (int(v) for v in args.frame_size.split("x"))
    frames_about = frame_set("synthetic", width, height, count=args.batch)
    frames = [decode_image(jpeg) for jpeg in frames_about.jpegs]
    result: dict[str, Any] = {
        "environment": {
            **environment(),
            "device": args.device
            if not args.device.startswith("cuda")
            else torch.cuda.get_device_name(torch.device(args.device)),
            "torchao": _version("torchao"),
            "cpu_threads": torch.get_num_threads(),
            "commit": _commit(),
        },
        "command": "python -m benchmarks.precision_bench " + " ".join(argv or sys.argv[1:]),
        "frames": {**frames_about.describe(), "size": f"{width}x{height}"},
        "models": [],
        "rows": [],
    }

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        if args.table:
            Path(args.table).write_text(markdown(result))

    def sink(row: dict[str, Any]) -> None:
        print(row, flush=True)
        result["rows"].append(row)
        write()

    with tempfile.TemporaryDirectory() as tmp:
        for label in models:
            if label == "published":
                source = str(published_with_random_weights(args.rmbg_dir, Path(tmp) / "rmbg"))
            else:
                source = STANDIN
            result["models"].append(bench_model(label, source, args, frames, sink))
            write()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
