"""RMBG-2.0's Swin blocks, kernel by kernel: PyTorch's ops against the fast path's Triton kernels.

For every block geometry of the published Swin-L backbone (its four stages at the input
size and at half of it, shifted and not), on tensors of the model's shapes at ``--batch``,
this times (CUDA events, the median of ``--reps``):

- window attention: ``F.scaled_dot_product_attention`` as the ``sdpa`` step calls it
  (q, k and v taken from the ``qkv`` projection, the output back to tokens) against
  :func:`segmentation.models.rmbg20_kernels.window_attention` with each tile configuration
  of ``--tiles``, and the largest difference of each from an FP32 reference;
- the block's first layer norm with its move into windows (``F.layer_norm``, pad, gather)
  against ``ln_windows``, and the move back with the residual and the second layer norm
  against ``unwindow_residual_ln``.

Each row's per-frame figure counts the blocks of that geometry in one forward::

    python -m benchmarks.window_attention --batch 16 --out window-attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.model_bench import environment
from segmentation.models import rmbg20_kernels
from segmentation.models.rmbg20_fast import _shift_mask, windowed_attention

#: Swin-L as RMBG-2.0 configures it: blocks, channels and heads per stage, window size.
DEPTHS, CHANNELS, HEADS, WINDOW = (2, 2, 18, 2), (192, 384, 768, 1536), (6, 12, 24, 48), 12
DEFAULT_TILES = (
    "64x32x4x3,64x32x4x2,64x64x4x3,64x64x4x2,32x64x4x2,64x128x4x2,128x64x8x2,128x32x8x2,32x32x2x2"
)


@dataclass(frozen=True)
class Geometry:
    """One Swin block geometry of the forward: how many blocks have it."""

    input_size: int
    stage: int
    side: int  # tokens a side before padding
    channels: int
    heads: int
    shifted: bool
    blocks: int

    @property
    def padded(self) -> int:
        return math.ceil(self.side / WINDOW) * WINDOW

    @property
    def windows(self) -> int:
        return (self.padded // WINDOW) ** 2


def geometries(input_size: int = 1024) -> list[Geometry]:
    """The block geometries of one forward: the backbone at ``input_size`` and at half of it
    (the published model's two-scale input), each stage's blocks half shifted."""
    out = []
    for size in (input_size, input_size // 2):
        for stage, (depth, channels, heads) in enumerate(zip(DEPTHS, CHANNELS, HEADS, strict=True)):
            side = size // 4 // 2**stage
            for shifted in (False, True):
                out.append(Geometry(size, stage + 1, side, channels, heads, shifted, depth // 2))
    return out


def parse_tiles(text: str) -> list[dict[str, int]]:
    """``MxNxWxS,...`` (query rows, key rows, warps, stages) as kernel settings."""
    tiles = []
    for item in text.split(","):
        m, n, warps, stages = (int(v) for v in item.split("x"))
        tiles.append({"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages})
    return tiles


def _time(fn: Any, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, CUDA events, after warming."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(
    geometry: Geometry, batch: int, tiles: list[dict[str, int]], reps: int
) -> dict[str, Any]:
    """One geometry's rows (see the module's docstring)."""
    g, device, dtype = geometry, "cuda", torch.float16
    gen = torch.Generator(device=device).manual_seed(0)
    tokens, c = WINDOW * WINDOW, g.channels
    qkv = torch.randn(batch * g.windows, tokens, 3 * c, device=device, generator=gen).to(dtype)
    bias = torch.randn(g.heads, tokens, tokens, device=device, generator=gen) * 2
    if g.shifted:
        mask = _shift_mask(g.padded, g.padded, WINDOW, WINDOW // 2, torch.device(device))
        bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, -1, tokens, tokens)
    else:
        bias = bias.unsqueeze(0)
    bias = bias.to(dtype).contiguous()
    scale = (c // g.heads) ** -0.5
    reference = rmbg20_kernels.window_attention_reference(qkv.float(), bias.float(), g.heads, scale)
    per_frame = g.blocks / batch
    row: dict[str, Any] = {**asdict(g), "batch": batch}
    sdpa = lambda: windowed_attention(qkv, bias, g.heads, scale)  # noqa: E731
    row["sdpa_ms"] = _time(sdpa, reps)
    row["sdpa_max_diff"] = float((sdpa().float() - reference).abs().max())
    row["kernel"] = []
    for tile in tiles:
        run = lambda: rmbg20_kernels.window_attention(qkv, bias, g.heads, scale, tiles=tile)  # noqa: B023, E731
        try:
            ms = _time(run, reps)
            diff = float((run().float() - reference).abs().max())
        except Exception as exc:  # a tile the compiler refuses (shared memory): say so
            row["kernel"].append({**tile, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        row["kernel"].append({**tile, "ms": ms, "max_diff": diff})
    row["sdpa_ms_per_frame"] = row["sdpa_ms"] * per_frame

    # the layer norms and moves of tokens around the attention
    hp = g.padded
    x = torch.randn(batch, g.side * g.side, c, device=device, generator=gen).to(dtype)
    norm = torch.nn.LayerNorm(c, device=device, dtype=dtype)
    shift = WINDOW // 2 if g.shifted else 0
    rows_ = (torch.arange(hp, device=device) + shift) % hp
    grid = rows_[:, None] * hp + rows_[None, :]
    to_windows = (
        grid.view(hp // WINDOW, WINDOW, hp // WINDOW, WINDOW).permute(0, 2, 1, 3).reshape(-1)
    )
    inverse = torch.empty_like(to_windows)
    inverse[to_windows] = torch.arange(hp * hp, device=device)
    from_windows = inverse.view(hp, hp)[: g.side, : g.side].reshape(-1)
    r, col = to_windows // hp, to_windows % hp
    sources = torch.where((r < g.side) & (col < g.side), r * g.side + col, -1)
    attended = torch.randn(batch * g.windows, tokens, c, device=device, generator=gen).to(dtype)
    out_bias = torch.randn(c, device=device, generator=gen).to(dtype)

    def torch_in() -> torch.Tensor:
        y = norm(x).view(batch, g.side, g.side, c)
        y = F.pad(y, (0, 0, 0, hp - g.side, 0, hp - g.side)).reshape(batch, hp * hp, c)
        return y.index_select(1, to_windows)

    def torch_out() -> tuple[torch.Tensor, torch.Tensor]:
        total = x + attended.reshape(batch, -1, c).index_select(1, from_windows)
        return total + out_bias, norm(total)

    def kernel_in() -> torch.Tensor:
        return rmbg20_kernels.ln_windows(x, norm.weight, norm.bias, norm.eps, sources)

    def kernel_out() -> tuple[torch.Tensor, torch.Tensor]:
        return rmbg20_kernels.unwindow_residual_ln(
            x, attended, from_windows, norm.weight, norm.bias, norm.eps, out_bias
        )

    row["into_windows"] = {
        "torch_ms": _time(torch_in, reps),
        "kernel_ms": _time(kernel_in, reps),
        "max_diff": float((torch_in().float() - kernel_in().float()).abs().max()),
    }
    row["out_of_windows"] = {
        "torch_ms": _time(torch_out, reps),
        "kernel_ms": _time(kernel_out, reps),
        "max_diff": max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(torch_out(), kernel_out(), strict=True)
        ),
    }
    return row


def summarise(rows: list[dict[str, Any]], tiles: list[dict[str, int]]) -> dict[str, Any]:
    """Per-frame milliseconds of each way over the whole forward, and the best single tile."""
    per_frame = lambda row, ms: ms * row["blocks"] / row["batch"]  # noqa: E731
    totals: dict[str, float] = {"sdpa": sum(per_frame(r, r["sdpa_ms"]) for r in rows)}
    for i, tile in enumerate(tiles):
        label = "{BLOCK_M}x{BLOCK_N}x{num_warps}x{num_stages}".format(**tile)
        times = [r["kernel"][i].get("ms") for r in rows]
        if all(t is not None for t in times):
            totals[label] = sum(per_frame(r, t) for r, t in zip(rows, times, strict=True))
    best_each = sum(
        per_frame(r, min(k["ms"] for k in r["kernel"] if "ms" in k)) for r in rows if r["kernel"]
    )
    glue = {
        way: sum(
            per_frame(r, r[part][f"{way}_ms"])
            for r in rows
            for part in ("into_windows", "out_of_windows")
        )
        for way in ("torch", "kernel")
    }
    return {
        "attention_ms_per_frame": {k: round(v, 3) for k, v in totals.items()},
        "attention_best_tile_each_geometry_ms_per_frame": round(best_each, 3),
        "norms_and_moves_ms_per_frame": {k: round(v, 3) for k, v in glue.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=1024)
    parser.add_argument("--tiles", default=DEFAULT_TILES, help="MxNxWARPSxSTAGES,...")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("window_attention times CUDA kernels: run it on a machine with a GPU")
    tiles = parse_tiles(args.tiles)
    rows = []
    for geometry in geometries(args.input_size):
        row = measure(geometry, args.batch, tiles, args.reps)
        rows.append(row)
        best = min((k for k in row["kernel"] if "ms" in k), key=lambda k: k["ms"], default=None)
        print(
            f"{geometry.input_size}px stage {geometry.stage} shifted={geometry.shifted}: "
            f"sdpa {row['sdpa_ms']:.3f} ms, best kernel {best}; "
            f"in {row['into_windows']}, out {row['out_of_windows']}",
            flush=True,
        )
    result = {
        "environment": environment(),
        "command": "python -m benchmarks.window_attention " + " ".join(argv or sys.argv[1:]),
        "tiles": tiles,
        **summarise(rows, tiles),
        "rows": rows,
    }
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("rows", "environment")}, indent=1)
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
