"""RMBG-2.0's Swin blocks compiled ahead of time: AOTInductor packages, no tracing at start-up.

``torch.compile`` of the block body (the fast path's ``compile`` step) traces every block
geometry with Dynamo when a replica starts, even when Inductor finds the compiled code in an
artifact: 18.9 s of tracing, 6.9 s of guards and 9.7 s of cache lookups of a 48.9-59.3 s
start on an H200 (docs/benchmarks.md, 2026-11-28). Here each geometry's body is exported once
(``torch.export``, the batch size a dynamic dimension) and compiled by AOTInductor into a
package, a shared library and its metadata; a replica loads the packages (a ``dlopen`` each)
and calls them with the block's tensors. Nothing is traced or compiled at start-up.

**One program per geometry, weights as inputs.** The body is written over plain tensors
(:func:`block_tensors`): a block's weights, its window gathers and its attention bias are
arguments, not constants baked into the library, so the 48 block calls of a forward of the
published model (24 blocks, on the image and on its half) share the 16 programs of their 16
geometries (channels, heads, window, shift, token grid), and
a package holds code only (a few MB), whatever the weights.

**Which blocks.** Only blocks whose arithmetic :func:`block_tensors` reproduces
(:func:`plain_block`: LayerNorms, linear layers with plain weights, exact GELU, no dropout in
eval): a block whose linear layers hold FP8 or INT8 weights (torchao tensor subclasses) keeps
the Inductor-cache artifact of :mod:`segmentation.compile_cache`. A batch of one, an FP32
recompute, a batch larger than the packages were built for, or a geometry they lack runs the
eager body: never a compile mid-request.

**Beside the Inductor artifact, not instead of it.** ``python -m segmentation.compile_cache
DIR --ahead-of-time`` writes the programs (``<key>.aoti``) next to Inductor's caches
(``<key>.inductor``). A replica uses the programs when its torch can load them, which it tries
first in a process of its own (:func:`check_loader`); the builder tries too and records a
failure in the manifest, which replicas on the same torch believe without trying (a crashing
test took 51.5 s). On the GPU machines' torch
2.11.0+cu130 the package loader crashed the process on every package, a one-layer model's
included (2026-11-28, docs/benchmarks.md), while the same code loads and runs on the CPU with
torch 2.14.1. Then, or where the programs are missing, the Inductor caches as before.

Packages hold compiled code that the process runs: load only packages you built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from segmentation.compile_cache import shared_mode
from segmentation.models.rmbg20_fast import (
    WindowPlan,
    token_order,
    window_plan,
    window_tokens,
    windowed_attention,
)

logger = logging.getLogger(__name__)

#: The manifest of a package directory: its programs and the batch sizes they take.
MANIFEST = "manifest.json"
#: Smallest batch a program takes (a single frame runs the eager body).
MIN_BATCH = 2
#: The tensors of a block a program takes after its window gathers and bias, in order.
WEIGHTS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


@dataclass(frozen=True)
class BlockGeometry:
    """What one program is specialised to: everything of a block call but its batch size and
    its tensors."""

    height: int
    width: int
    padded: tuple[int, int]
    window: int
    shift: int
    channels: int
    hidden: int
    heads: int
    scale: float
    eps: float
    dtype: str

    @property
    def name(self) -> str:
        """Readable, and unique: the fields it does not spell out are in its hash."""
        hp, wp = self.padded
        kind = self.dtype.removeprefix("torch.")
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return (
            f"c{self.channels}-h{self.heads}-w{self.window}-s{self.shift}"
            f"-{self.height}x{self.width}-p{hp}x{wp}-{kind}-{digest[:8]}"
        )


def block_geometry(block: Any, x: torch.Tensor, plan: WindowPlan) -> BlockGeometry:
    return BlockGeometry(
        height=int(block.H),
        width=int(block.W),
        padded=(int(plan.padded[0]), int(plan.padded[1])),
        window=int(block.window_size),
        shift=int(block.shift_size),
        channels=int(x.shape[-1]),
        hidden=int(block.mlp.fc1.out_features),
        heads=int(block.attn.num_heads),
        scale=float(block.attn.scale),
        eps=float(block.norm1.eps),
        dtype=str(x.dtype),
    )


def plain_block(block: torch.nn.Module) -> bool:
    """Whether :func:`block_tensors` computes what ``block`` does in eval mode: LayerNorms
    with weight and bias, linear layers with plain weights and a bias, exact GELU, an MLP of
    ``fc1``, ``act``, ``fc2`` (and dropouts) only, nothing in training mode."""
    try:
        linears = [block.get_submodule(n) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        norms = [block.get_submodule(n) for n in ("norm1", "norm2")]
        act = block.get_submodule("mlp.act")
        mlp = block.get_submodule("mlp")
    except AttributeError:
        return False
    mlp_parts = {
        name for name, child in mlp.named_children() if type(child) is not torch.nn.Dropout
    }
    return (
        not any(m.training for m in block.modules())
        and mlp_parts == {"fc1", "act", "fc2"}
        and all(type(m) is torch.nn.Linear and m.bias is not None for m in linears)
        and all(type(cast(torch.nn.Linear, m).weight.detach()) is torch.Tensor for m in linears)
        and all(
            type(m) is torch.nn.LayerNorm and m.weight is not None and m.bias is not None
            for m in norms
        )
        and norms[0].eps == norms[1].eps
        and type(act) is torch.nn.GELU
        and act.approximate == "none"
    )


def block_inputs(block: torch.nn.Module, plan: WindowPlan) -> tuple[torch.Tensor, ...]:
    """The tensors a program takes besides the tokens: the plan's, then :data:`WEIGHTS`."""
    weights = [block.get_parameter(name).detach() for name in WEIGHTS]
    return (plan.to_windows, plan.from_windows, plan.bias, *weights)


def block_tensors(
    x: torch.Tensor, inputs: Sequence[torch.Tensor], geometry: BlockGeometry
) -> torch.Tensor:
    """The fast path's Swin block body (``rmbg20_fast._swin_block_body``) over plain tensors."""
    to_windows, from_windows, bias, n1w, n1b, qkv_w, qkv_b, proj_w, proj_b = inputs[:9]
    n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b = inputs[9:]
    channels = x.shape[-1]
    windows = window_tokens(
        F.layer_norm(x, (channels,), n1w, n1b, geometry.eps),
        geometry.height,
        geometry.width,
        geometry.padded,
        to_windows,
        geometry.window,
    )
    attended = windowed_attention(
        F.linear(windows, qkv_w, qkv_b), bias, geometry.heads, geometry.scale
    )
    x = x + token_order(F.linear(attended, proj_w, proj_b), x.shape[0], from_windows)
    hidden = F.gelu(F.linear(F.layer_norm(x, (channels,), n2w, n2b, geometry.eps), fc1_w, fc1_b))
    return x + F.linear(hidden, fc2_w, fc2_b)


class BlockProgram(torch.nn.Module):
    """:func:`block_tensors` of one geometry as a module: what is exported."""

    def __init__(self, geometry: BlockGeometry) -> None:
        super().__init__()
        self.geometry = geometry

    def forward(self, x: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return block_tensors(x, inputs, self.geometry)


@dataclass
class BlockCall:
    """One call of a plain block, as :func:`recorded_calls` saw it."""

    geometry: BlockGeometry
    x: torch.Tensor
    inputs: tuple[torch.Tensor, ...]


@contextmanager
def recorded_calls(model: torch.nn.Module, batch: int = MIN_BATCH) -> Iterator[list[BlockCall]]:
    """The first call at ``batch`` frames of each geometry of ``model``'s plain Swin blocks
    while in the block (one forward of the fast path at that batch sees them all)."""
    calls: list[BlockCall] = []
    seen: set[BlockGeometry] = set()

    def record(block: Any, args: tuple[Any, ...]) -> None:
        x = args[0]
        if x.shape[0] != batch or not plain_block(block):
            return
        plan = window_plan(block, int(block.H), int(block.W), x)
        geometry = block_geometry(block, x, plan)
        if geometry not in seen:
            seen.add(geometry)
            calls.append(BlockCall(geometry, x.detach().clone(), block_inputs(block, plan)))

    hooks = [
        module.register_forward_pre_hook(record)
        for module in model.modules()
        if "_fast_body" in module.__dict__  # a Swin block the fast path patched
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def export_programs(calls: Sequence[BlockCall], directory: Path, max_batch: int) -> Path:
    """Compile one package per geometry of ``calls`` for batches ``MIN_BATCH..max_batch`` into
    ``directory`` (replaced in one rename when complete: a replica never sees half of it)."""
    if not calls:
        raise ValueError("no Swin block the fast path recognises ran: nothing to compile")
    if max_batch < MIN_BATCH:
        raise ValueError(f"max_batch must be at least {MIN_BATCH} (a single frame runs eager)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    # (a range of one size is no dimension to export: the program takes one more)
    batch = torch.export.Dim("batch", min=MIN_BATCH, max=max(max_batch, MIN_BATCH + 1))
    try:
        programs: list[dict[str, Any]] = []
        for call in calls:
            exported = torch.export.export(
                BlockProgram(call.geometry),
                (call.x.contiguous(), call.inputs),
                dynamic_shapes=({0: batch}, (None,) * len(call.inputs)),
            )
            file = f"{call.geometry.name}.pt2"
            if (building / file).exists():
                raise ValueError(f"two block geometries named {file}")
            torch._inductor.aoti_compile_and_package(exported, package_path=str(building / file))
            programs.append({"file": file, "geometry": asdict(call.geometry)})
            logger.info("compiled block program %s", call.geometry.name)
        manifest = {
            "min_batch": MIN_BATCH,
            "max_batch": max_batch,
            "programs": programs,
            "loader": loader_verdict(building / programs[0]["file"], calls[0].x.device),
        }
        (building / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.chmod(building, shared_mode(0o777))  # mkdtemp made it private
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, old / directory.name)
        os.replace(building, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return directory


@dataclass
class BlockPrograms:
    """The loaded packages of a directory, by geometry."""

    programs: Mapping[BlockGeometry, Callable[..., Any]]
    min_batch: int
    max_batch: int
    #: Block calls since the load: ``program`` (a program ran), ``batch`` (a batch size
    #: outside the programs' range: the eager body), ``geometry`` (no program for it: eager).
    calls: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        return (
            f"programs for {len(self.programs)} Swin block geometries, "
            f"batches {self.min_batch}-{self.max_batch}"
        )


#: Seconds the test process of :func:`check_loader` may take.
PROBE_TIMEOUT_S = 120
#: A process that loads one package (argv: its path, the device index) and exits.
PROBE = (
    "import sys, torch._inductor\n"
    "torch._inductor.aoti_load_package(sys.argv[1], device_index=int(sys.argv[2]))\n"
)


def check_loader(package: Path, device_index: int) -> None:
    """Load ``package`` in a process of its own first: a loader that crashes (torch
    2.11.0+cu130's did, on every package, on an H200: docs/benchmarks.md) must not take
    the replica down with it. RuntimeError when that process fails."""
    failed = (
        f"torch {torch.__version__}'s AOTInductor loader failed on {package.name} in a test process"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(package), str(device_index)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{failed} (no answer within {PROBE_TIMEOUT_S} s)") from None
    except OSError as exc:
        raise RuntimeError(f"{failed} ({exc})") from None
    if done.returncode != 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"status {done.returncode}"
        tail = " ".join(done.stderr.strip().splitlines()[-2:])[-300:]
        raise RuntimeError(f"{failed} ({how}{': ' + tail if tail else ''})")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else -1


def loader_verdict(package: Path, device: torch.device) -> dict[str, Any]:
    """Whether this torch loads ``package`` (:func:`check_loader`), for the manifest: a
    replica on the same torch believes a failure instead of testing again (a crashing loader
    took 51.5 s to fail in its test process on an H200), and tests a success again."""
    try:
        check_loader(package, _index(device))
    except RuntimeError as exc:
        return {"torch": torch.__version__, "loads": False, "error": str(exc)}
    return {"torch": torch.__version__, "loads": True}


def load_programs(directory: Path, device: torch.device) -> BlockPrograms:
    """Every package of ``directory``'s manifest, loaded for ``device``, where the loader
    works: as the manifest found when it was built with this torch, or else once one of them
    loaded in a test process (:func:`check_loader`). ValueError or RuntimeError (or the
    loader's own error) when the directory is not a complete set or the loader fails."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if not manifest["programs"]:
        raise ValueError(f"{directory / MANIFEST} lists no programs")
    index = _index(device)
    verdict = manifest.get("loader") or {}
    if verdict.get("torch") == torch.__version__ and not verdict["loads"]:
        raise RuntimeError(f"{verdict['error']}, when the programs were built")
    # Loaded at build time, or with another torch: this host may still differ (driver,
    # libraries), and a crash here would take the replica down; a test process costs seconds.
    check_loader(directory / manifest["programs"][0]["file"], index)
    programs: dict[BlockGeometry, Callable[..., Any]] = {}
    for entry in manifest["programs"]:
        fields = dict(entry["geometry"])
        fields["padded"] = tuple(fields["padded"])
        geometry = BlockGeometry(**fields)
        # run_single_threaded: no locking inside the runner, which CUDA-graph capture
        # needs; the segmentor runs one forward at a time.
        programs[geometry] = torch._inductor.aoti_load_package(
            str(directory / entry["file"]), run_single_threaded=True, device_index=index
        )
    return BlockPrograms(programs, int(manifest["min_batch"]), int(manifest["max_batch"]))


def install(model: torch.nn.Module, loaded: BlockPrograms) -> int:
    """Have ``model``'s plain fast-path Swin blocks call ``loaded``'s programs; the number of
    blocks whose geometry at the next call a program may take (all plain patched blocks)."""

    def run(block: Any, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor | None:
        if block.training:
            return None  # a program is the eval-mode body
        if not loaded.min_batch <= x.shape[0] <= loaded.max_batch:
            loaded.calls["batch"] += 1
            return None
        program = loaded.programs.get(block_geometry(block, x, plan))
        if program is None:
            loaded.calls["geometry"] += 1
            return None
        loaded.calls["program"] += 1
        # the programs were exported from contiguous tokens, and assume their strides
        return cast(torch.Tensor, program(x.contiguous(), block_inputs(block, plan)))

    count = 0
    for module in model.modules():
        if "_fast_body" in module.__dict__ and plain_block(module):
            module.__dict__["_fast_program"] = run
            count += 1
    return count
