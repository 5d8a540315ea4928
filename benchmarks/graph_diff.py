"""Where CUDA-graph replay of RMBG-2.0 parts from its eager forward, and why: a one-GPU diagnostic.

``tests/gpu/test_graphs_gpu.py`` compared the logits of a replayed graph with the eager forward
at an absolute and relative 0.02 and failed on an H100: 0.0269 at most, 969 of 3,145,728 logits
out of tolerance. This script runs the test's model (the published RMBG-2.0 code, random
weights, seed 0, the pure FP16 fast path) on the test's input (three 1920x1080
``product_frame`` shots, padded to bucket 4) and measures, each section on its own (a failure
is recorded in the JSON and the other sections still run):

a. eager against eager again: is the forward deterministic at all?
b. eager on the default stream against eager on side streams (cuBLAS keeps its workspace per
   stream; the graphs warm up on a side stream).
c. eager against replay, four ways: the service's capture (``GraphedForward``: warm-up on a
   side stream, then capture), a capture with no warm-up of its own, a warm-up on the stream
   the capture then uses, and the test's own sequence (graphs for 1, 2 and 4 in one pool,
   replay, an FP32 recompute of one frame, replay again); and eager again after the captures.
d/e. the same comparisons under switches that change which kernels run: FP16 reduced-precision
   and split-K reductions in cuBLAS, cuBLAS/cuBLASLt workspace sizes (0 and the documented
   deterministic 32 MiB), the BLAS library, each SDPA backend, cuDNN off, deterministic
   algorithms.
f. what users see: the sigmoid and uint8 mattes (at the model's size and through
   ``postprocess`` at 1080p), eager and replay each against an FP32 forward of the same
   weights, the logits' magnitude, and every quantity the test asserts, with its limit.
g. where the difference first appears: hooks on every module keep a copy of its input and
   output (in eager runs a copy; during capture a copy inside the graph, so each replay
   refreshes it). Reported: the first module call whose output differs, and the deepest calls
   whose output differs although their input does not (the op that rounds differently is in
   them, outside their child modules), for eager against eager and eager against replay.
h. the kernels each path launched (``torch.profiler``), and those launched by only one.
i. the SDPA backend PyTorch picks for each attention call, per section, eager and in capture.
j. eager after the allocator's free blocks are filled with NaN bytes, then with 1.0s: a read of
   memory no kernel wrote would change the answer.

    python -m benchmarks.graph_diff --rmbg-dir third_party/rmbg20 --out graph-diff.json

About a minute on an H100 (``--sections a,c,g`` picks sections; ``--budget-s`` skips what
would start after that many seconds). The JSON is rewritten after every section; its
``conclusions`` list reads the measurements back in words.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

FRAMES = 3  # real frames; the batch runs padded to the bucket 4 as in the test
BUCKETS = (1, 2, 4)
OLD_TOLERANCE = 2e-2  # the test's former atol and rtol on logits
SATURATED = 6.0  # |logit| beyond which the sigmoid is within 0.0025 (0.63/255) of 0 or 1
RECORD_ELEMENTS = 1 << 20  # elements of each hooked tensor kept whole (section g)
RECORD_CHUNKS = 256  # and FP32 sums of this many chunks of the whole tensor
LIST_LIMIT = 30
SECTIONS = "abcfghije"
ENV_VARS = (
    "CUBLAS_WORKSPACE_CONFIG",
    "CUBLASLT_WORKSPACE_SIZE",
    "TORCH_CUBLASLT_UNIFIED_WORKSPACE",
    "TORCH_CUDNN_SDPA_DEPRIORITIZED",
    "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF",
    "CUDA_VISIBLE_DEVICES",
)


# --- the case: model, input, eager reference --------------------------------------------------


def logits_of(outputs: object) -> Tensor:
    """The full-resolution logits: the last of BiRefNet's maps in eval mode."""
    if isinstance(outputs, (list, tuple)):
        return outputs[-1]
    assert isinstance(outputs, Tensor)
    return outputs


def select(outputs: object) -> tuple[Tensor, ...]:
    return (logits_of(outputs),)


class Case:
    """The test's model and input, and the eager logits every section compares against."""

    def __init__(self, rmbg_dir: str) -> None:
        from segmentation.batching import pad_to_bucket
        from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
        from tests.conftest import product_frame

        torch.manual_seed(0)
        self.model = RMBG20Segmentor(
            str(Path(rmbg_dir).resolve()),
            device="cuda",
            trust_remote_code=True,
            load_format="dummy",
        )
        self.model.batch_buckets = BUCKETS
        self.frames = [product_frame(1920, 1080, seed=i) for i in range(FRAMES)]
        self.sizes = [frame.shape[:2] for frame in self.frames]
        self.batch = self.model.preprocess(self.frames)
        self.padded = pad_to_bucket(self.batch, BUCKETS)
        self.device = self.padded.device
        self.eager = self.run_eager()
        self.replayed: Tensor | None = None  # the test's replay (section c), for section f
        self._fp32: Tensor | None = None

    def run_eager(self) -> Tensor:
        return logits_of(self.model.model(self.padded)).clone()

    def fp32(self) -> Tensor:
        """FP32 logits of the same weights and input (the FP32 recompute's own path)."""
        if self._fp32 is None:
            from segmentation.models.rmbg20_segmentor import _in_fp32

            with _in_fp32(self.model.model):
                self._fp32 = logits_of(self.model.model(self.padded.float())).clone()
            free()
        return self._fp32


def free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# --- comparisons ------------------------------------------------------------------------------


def num(value: Tensor | float) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def fp16_ulp(x: Tensor) -> Tensor:
    """The spacing of FP16 numbers at each value of ``x`` (subnormals: 2**-24)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return torch.pow(2.0, exponent - 10)


def levels(probs: Tensor) -> Tensor:
    return (probs * 255.0).round()


def compare(got: Tensor, reference: Tensor, *, brief: bool = False) -> dict[str, Any]:
    """How far logits ``got`` are from ``reference`` over the real frames: in logits (absolute,
    in FP16 ulps of the reference, and as the test's former tolerance counted them), after the
    sigmoid (in 1/255) and as uint8 mattes at the model's size."""
    a = got[:FRAMES].float()
    b = reference[:FRAMES].float()
    diff = (a - b).abs()
    finite = torch.isfinite(diff)
    clean = torch.where(finite, diff, torch.zeros_like(diff))
    differing = clean != 0
    out: dict[str, Any] = {
        "bitwise_equal": bool(torch.equal(a, b)),
        "max_abs": num(clean.max()),
        "mean_abs": num(clean.mean()),
        "differing_elements": int(differing.sum()),
        "elements": diff.numel(),
        "nonfinite": int((~finite).sum()),
        "old_test_failures": int((clean > OLD_TOLERANCE + OLD_TOLERANCE * b.abs()).sum()),
    }
    probs = (a.sigmoid() - b.sigmoid()).abs().nan_to_num(1.0)
    level_gap = (levels(a.sigmoid()) - levels(b.sigmoid())).abs().nan_to_num(255.0)
    out["sigmoid_max_x255"] = num(probs.max() * 255)
    out["matte_1024_max_levels"] = int(level_gap.max())
    if brief:
        return out
    out["sigmoid_mean_x255"] = num(probs.mean() * 255)
    out["matte_1024_pixels_over_1"] = int((level_gap > 1).sum())
    out["matte_1024_pixels_over_2"] = int((level_gap > 2).sum())
    if out["differing_elements"]:
        ulps = clean / fp16_ulp(b)
        where = int(clean.flatten().argmax())
        out["at_max"] = {
            "reference": num(b.flatten()[where]),
            "value": num(a.flatten()[where]),
            "fp16_ulp_of_reference": num(fp16_ulp(b.flatten()[where])),
        }
        picked = ulps[differing]
        out["ulps_where_differing"] = {
            "median": num(picked.median()),
            "max": num(picked.max()),
        }
        gaps = clean[differing]
        if gaps.numel() <= 1 << 24:  # torch.quantile's limit
            out["p99_abs_where_differing"] = num(torch.quantile(gaps, 0.99))
        failing = clean > OLD_TOLERANCE + OLD_TOLERANCE * b.abs()
        if bool(failing.any()):
            out["old_test_failures_reference_abs_max"] = num(b.abs()[failing].max())
    return out


def magnitude(logits: Tensor) -> dict[str, Any]:
    """How large the logits of random weights are (an absolute tolerance means little on them)."""
    x = logits[:FRAMES].float().abs().flatten()
    finite = torch.isfinite(x)
    x = x[finite]
    sample = x[:: -(-x.numel() // (1 << 24))]  # torch.quantile takes at most 2**24 values
    quantiles = torch.quantile(sample, torch.tensor([0.5, 0.9, 0.99, 0.999], device=x.device))
    return {
        "max_abs": num(x.max()),
        "mean_abs": num(x.mean()),
        "p50_abs": num(quantiles[0]),
        "p90_abs": num(quantiles[1]),
        "p99_abs": num(quantiles[2]),
        "p999_abs": num(quantiles[3]),
        "fraction_saturated_abs_over_6": num((x > SATURATED).float().mean()),
        # where a difference of 0.0269 exceeds atol + rtol * |x| at 0.02 each
        "fraction_abs_below_0_345": num((x < 0.345).float().mean()),
        "nonfinite": int((~finite).sum()),
    }


def matte_gap(case: Case, got: Tensor, reference: Tensor) -> dict[str, Any]:
    """uint8 mattes at the frames' own size (1080p) as ``predict`` returns them."""
    a = case.model.postprocess(got[:FRAMES], case.sizes)
    b = case.model.postprocess(reference[:FRAMES], case.sizes)
    gaps = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b, strict=True)]
    return {
        "max_levels": max(int(g.max()) for g in gaps),
        "pixels_over_1": sum(int((g > 1).sum()) for g in gaps),
        "pixels_over_2": sum(int((g > 2).sum()) for g in gaps),
        "pixels": sum(g.size for g in gaps),
    }


# --- graphs -----------------------------------------------------------------------------------


def service_graph(case: Case) -> Any:
    """One graph of the padded batch, captured as the service captures (GraphedForward)."""
    from segmentation.graphs import GraphedForward

    graphs = GraphedForward(case.model.model, select, case.device)
    graphs.capture([case.padded])
    return graphs


def replay(graphs: Any, case: Case) -> Tensor:
    (out,) = graphs(case.padded)
    return out


def raw_capture(case: Case, warm_on_capture_stream: bool) -> Tensor:
    """A graph captured by hand: with no warm-up of its own (eager already ran), or warmed up
    on the very stream the capture then uses."""
    static = case.padded.clone()
    stream = torch.cuda.Stream(case.device)
    if warm_on_capture_stream:
        stream.wait_stream(torch.cuda.current_stream(case.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                case.model.model(static)
        torch.cuda.current_stream(case.device).wait_stream(stream)
    free()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        (out,) = select(case.model.model(static))
    graph.replay()
    result = out.clone()
    del graph, out
    free()
    return result


# --- switches ---------------------------------------------------------------------------------


@contextmanager
def fp16_reduction(value: bool | tuple[bool, bool]) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    old = (
        matmul.allow_fp16_reduced_precision_reduction,
        getattr(matmul, "allow_fp16_reduced_precision_reduction_split_k", True),
    )
    matmul.allow_fp16_reduced_precision_reduction = value
    try:
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction = old


@contextmanager
def blas_workspaces(size: int) -> Iterator[None]:
    cuda = torch.backends.cuda
    old = (cuda.cublas_workspace_size(), cuda.cublaslt_workspace_size())
    cuda.cublas_workspace_size(size)
    cuda.cublaslt_workspace_size(size)
    try:
        yield
    finally:
        cuda.cublas_workspace_size(old[0])
        cuda.cublaslt_workspace_size(old[1])


@contextmanager
def blas_library(name: str) -> Iterator[None]:
    old = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(old)


@contextmanager
def sdpa_only(backend_name: str) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, backend_name)]):
        yield


@contextmanager
def cudnn_settings(**settings: bool) -> Iterator[None]:
    cudnn = torch.backends.cudnn
    old = {name: getattr(cudnn, name) for name in settings}
    for name, value in settings.items():
        setattr(cudnn, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(cudnn, name, value)


@contextmanager
def deterministic() -> Iterator[None]:
    old = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.deterministic = old[2]


@contextmanager
def unchanged() -> Iterator[None]:
    yield


SWITCHES: list[tuple[str, Callable[[], AbstractContextManager[None]]]] = [
    ("default", unchanged),
    ("fp16_reduced_precision_reduction=False", lambda: fp16_reduction(False)),
    ("fp16_split_k=False", lambda: fp16_reduction((True, False))),
    ("fp16_reduced_precision_and_split_k=False", lambda: fp16_reduction((False, False))),
    ("blas_workspaces=0", lambda: blas_workspaces(0)),
    ("blas_workspaces=32MiB(:4096:8)", lambda: blas_workspaces(4096 * 8 * 1024)),
    ("blas=cublaslt", lambda: blas_library("cublaslt")),
    ("blas=cublas", lambda: blas_library("cublas")),
    ("sdpa=cudnn", lambda: sdpa_only("CUDNN_ATTENTION")),
    ("sdpa=efficient", lambda: sdpa_only("EFFICIENT_ATTENTION")),
    ("sdpa=math", lambda: sdpa_only("MATH")),
    ("cudnn=off", lambda: cudnn_settings(enabled=False)),
    ("deterministic_algorithms+cudnn.deterministic", deterministic),
]


# --- SDPA backend choices (section i) ---------------------------------------------------------


class SdpaChoices:
    """Wraps ``F.scaled_dot_product_attention`` (the fast path looks it up at each call) and
    counts the backend PyTorch's dispatcher picks for each call, per label and capture state."""

    def __init__(self) -> None:
        import torch.nn.functional as F

        self.functional = F
        self.original = F.scaled_dot_product_attention
        self.label = "build"
        self.counts: Counter[str] = Counter()
        try:
            from torch.nn.attention import SDPBackend

            self.names = {int(m.value): name for name, m in SDPBackend.__members__.items()}
        except Exception:
            self.names = {}

    def install(self) -> None:
        original = self.original

        def recording(
            query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
        ) -> Tensor:
            try:
                choice = int(
                    torch._fused_sdp_choice(
                        query,
                        key,
                        value,
                        kwargs.get("attn_mask", args[0] if args else None),
                        kwargs.get("dropout_p", 0.0),
                        kwargs.get("is_causal", False),
                        scale=kwargs.get("scale"),
                    )
                )
                backend = self.names.get(choice, str(choice))
            except Exception as exc:
                backend = f"unknown ({type(exc).__name__})"
            capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
            state = "capture" if capturing else "eager"
            shape = "x".join(map(str, query.shape))
            self.counts[f"{self.label} | {state} | {backend} | q {shape}"] += 1
            return original(query, key, value, *args, **kwargs)

        self.functional.scaled_dot_product_attention = recording

    def remove(self) -> None:
        self.functional.scaled_dot_product_attention = self.original

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# --- module hooks (section g) -----------------------------------------------------------------


def first_tensor(value: object) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class Call:
    """One module call: its input and output copies, and the call it ran inside."""

    def __init__(self, name: str, kind: str, parent: int | None) -> None:
        self.name = name
        self.kind = kind
        self.parent = parent
        self.finished: int | None = None  # rank in completion order
        self.input: tuple[Tensor, Tensor] | None = None
        self.output: tuple[Tensor, Tensor] | None = None


class Recorder:
    """Keeps a copy of every module's input and output: a prefix of RECORD_ELEMENTS elements
    and FP32 sums of RECORD_CHUNKS chunks of the whole tensor (so a difference anywhere shows).
    Under capture the copies are graph nodes writing into the graph's pool: replay refreshes
    them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[Call] = []
        self.stack: list[int] = []
        self.finished = 0
        self.active = False
        self.capture_only = False
        self.handles: list[Any] = []
        for name, module in model.named_modules():
            label = name or "<model>"
            kind = type(module).__name__
            self.handles.append(module.register_forward_pre_hook(self._pre(label, kind)))
            self.handles.append(module.register_forward_hook(self._post()))

    def _wanted(self) -> bool:
        return self.active and (not self.capture_only or torch.cuda.is_current_stream_capturing())

    def _pre(self, name: str, kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if not self._wanted():
                return
            call = Call(name, kind, self.stack[-1] if self.stack else None)
            tensor = first_tensor(args)
            if tensor is not None:
                call.input = self._copy(tensor)
            self.stack.append(len(self.calls))
            self.calls.append(call)

        return hook

    def _post(self) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: object) -> None:
            if not self._wanted() or not self.stack:
                return
            call = self.calls[self.stack.pop()]
            call.finished = self.finished
            self.finished += 1
            tensor = first_tensor(output)
            if tensor is not None:
                call.output = self._copy(tensor)

        return hook

    @staticmethod
    def _copy(tensor: Tensor) -> tuple[Tensor, Tensor]:
        flat = tensor.detach().reshape(-1)
        prefix = flat[:RECORD_ELEMENTS].clone()
        whole = flat.numel() // RECORD_CHUNKS * RECORD_CHUNKS
        if whole:
            sums = torch.sum(flat[:whole].view(RECORD_CHUNKS, -1), dim=1, dtype=torch.float32)
            tail = torch.sum(flat[whole:], dtype=torch.float32).reshape(1)
            sums = torch.cat((sums, tail))
        else:
            sums = flat.float().clone()
        return prefix, sums

    def take(self) -> list[Call]:
        calls, self.calls, self.stack, self.finished = self.calls, [], [], 0
        return calls

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def same(a: tuple[Tensor, Tensor] | None, b: tuple[Tensor, Tensor] | None) -> bool | None:
    if a is None or b is None:
        return None
    return bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))


def gap(a: tuple[Tensor, Tensor] | None, b: tuple[Tensor, Tensor] | None) -> float | None:
    if a is None or b is None or a[0].shape != b[0].shape:
        return None
    return num((a[0].float() - b[0].float()).abs().nan_to_num(math.inf).max())


def localize(reference: list[Call], got: list[Call]) -> dict[str, Any]:
    """The first module call whose output differs, and the deepest calls whose output differs
    though their input is the same (the op that rounds differently runs in them, outside the
    child modules listed with them)."""
    out: dict[str, Any] = {"calls": [len(reference), len(got)]}
    rows: list[dict[str, Any]] = []
    for index, (a, b) in enumerate(zip(reference, got, strict=False)):
        if a.name != b.name:
            out["warning"] = f"the runs' module calls part at call {index}: {a.name} / {b.name}"
            break
        rows.append(
            {
                "call": index,
                "module": a.name,
                "type": a.kind,
                "parent": a.parent,
                "finished": a.finished if a.finished is not None else math.inf,
                "input_same": same(a.input, b.input),
                "output_same": same(a.output, b.output),
                "output_max_abs": gap(a.output, b.output),
            }
        )
    if len(reference) != len(got) and "warning" not in out:
        out["warning"] = "the runs made different numbers of module calls"
    differing = [row for row in rows if row["output_same"] is False]
    out["calls_with_different_output"] = len(differing)
    if not differing:
        return out
    out["first_different_output"] = min(differing, key=lambda row: row["finished"])
    origins = {row["call"] for row in differing if row["input_same"] is True}
    ancestors: set[int] = set()
    for call in origins:
        parent = rows[call]["parent"]
        while parent is not None and parent < len(rows) and parent not in ancestors:
            ancestors.add(parent)
            parent = rows[parent]["parent"]
    deepest = [rows[call] for call in sorted(origins) if call not in ancestors]
    deepest_calls = {row["call"] for row in deepest}
    children: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row["parent"] in deepest_calls:
            children.setdefault(row["parent"], []).append(
                {k: row[k] for k in ("module", "type", "input_same", "output_same")}
            )
    out["deepest_origins_count"] = len(deepest)
    out["deepest_origins"] = [
        {**row, "children": children.get(row["call"], [])} for row in deepest[:LIST_LIMIT]
    ]
    out["deepest_origin_types"] = dict(Counter(row["type"] for row in deepest).most_common())
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        parts = row["module"].split(".")
        group = ".".join(parts[:3] if parts[0] == "bb" else parts[:2])
        entry = groups.setdefault(group, {"calls": 0, "different": 0, "max_abs": 0.0})
        entry["calls"] += 1
        if row["output_same"] is False:
            entry["different"] += 1
            entry["max_abs"] = max(entry["max_abs"], row["output_max_abs"] or 0.0)
    out["by_group"] = groups
    return out


# --- profiler (section h) ---------------------------------------------------------------------


def kernels(fn: Callable[[], object]) -> Counter[str]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names: Counter[str] = Counter()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            names[event.name[:240]] += 1
    return names


# --- sections ---------------------------------------------------------------------------------


def section_a(case: Case) -> dict[str, Any]:
    runs = [case.run_eager() for _ in range(3)]
    return {
        "logits_magnitude": magnitude(case.eager),
        **{f"eager_run_{i + 2}_vs_first": compare(run, case.eager) for i, run in enumerate(runs)},
    }


def section_b(case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {}
    current = torch.cuda.current_stream(case.device)
    for label in ("fresh_side_stream", "another_fresh_side_stream"):
        stream = torch.cuda.Stream(case.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            first = case.run_eager()
            second = case.run_eager()
        current.wait_stream(stream)
        torch.cuda.synchronize()
        out[f"{label}_vs_default_stream"] = compare(first, case.eager)
        out[f"{label}_second_run_vs_first"] = compare(second, first, brief=True)
    return out


def section_c(case: Case, sdpa: SdpaChoices) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sdpa.label = "c: service capture"
    graphs = service_graph(case)
    first = replay(graphs, case)
    second = replay(graphs, case)
    del graphs
    free()
    out["service_capture_replay_vs_eager"] = compare(first, case.eager)
    out["service_capture_replay_vs_replay"] = compare(second, first, brief=True)
    for label, warm in (("no_warm_up", False), ("warm_up_on_capture_stream", True)):
        sdpa.label = f"c: {label}"
        out[f"{label}_replay_vs_eager"] = compare(raw_capture(case, warm), case.eager)
    sdpa.label = "c: the test's sequence"
    model = case.model
    model.batch_buckets = BUCKETS
    captured = model.capture_graphs(BUCKETS)
    out["test_sequence_captured"] = captured
    out["test_sequence_graph_error"] = model.graph_error
    if captured:
        tested = model.forward(case.batch)
        again = model.forward(case.batch)
        broken = tested.clone()
        broken[1] = float("inf")
        fixed = model._recompute_non_finite(case.batch, broken)
        after = model.forward(case.batch)
        case.replayed = tested
        out["test_sequence"] = {
            "graph_batch_sizes": model.graph_batch_sizes,
            "replay_vs_eager": compare(tested, case.eager),
            "replay_vs_replay": compare(again, tested, brief=True),
            "replay_after_fp32_recompute_vs_before": compare(after, tested, brief=True),
            "recomputed_frame_fp32_vs_eager_fp16": compare(fixed[1:2], case.eager[1:2]),
            "other_frames_untouched": bool(
                torch.equal(fixed[0], tested[0].float())
                and torch.equal(fixed[2], tested[2].float())
            ),
        }
        model._graphs = None  # back to eager for the sections after this one
    free()
    sdpa.label = "c: eager after the captures"
    out["eager_after_captures_vs_eager"] = compare(case.run_eager(), case.eager, brief=True)
    return out


def section_e(case: Case, sdpa: SdpaChoices, deadline: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, switch in SWITCHES:
        if time.perf_counter() > deadline:
            out[name] = {"skipped": "time budget"}
            continue
        sdpa.label = f"e: {name}"
        started = time.perf_counter()
        try:
            with switch():
                first = case.run_eager()
                second = case.run_eager()
                graphs = service_graph(case)
                replayed = replay(graphs, case)
                del graphs
            out[name] = {
                "eager_vs_eager": compare(second, first, brief=True),
                "replay_vs_eager": compare(replayed, first, brief=True),
                "eager_vs_default_eager": compare(first, case.eager, brief=True),
            }
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        out[name]["seconds"] = round(time.perf_counter() - started, 2)
        free()
    return out


def section_f(case: Case) -> dict[str, Any]:
    exact = case.fp32()
    out: dict[str, Any] = {
        "fp32_logits_magnitude": magnitude(exact),
        "eager_fp16_vs_fp32": compare(case.eager, exact),
        "eager_fp16_vs_fp32_mattes_1080p": matte_gap(case, case.eager, exact),
    }
    replayed = case.replayed
    if replayed is None:  # section c did not run or failed: capture here as the service does
        graphs = service_graph(case)
        replayed = replay(graphs, case)
        del graphs
        free()
        out["replay_from"] = "service capture (section c's test sequence unavailable)"
    else:
        out["replay_from"] = "the test's sequence (section c)"
    out["replay_vs_eager"] = compare(replayed, case.eager)
    out["replay_vs_eager_mattes_1080p"] = matte_gap(case, replayed, case.eager)
    out["replay_vs_fp32"] = compare(replayed, exact)
    out["replay_vs_fp32_mattes_1080p"] = matte_gap(case, replayed, exact)
    eager_error = (case.eager[:FRAMES].float() - exact[:FRAMES]).abs()
    replay_error = (replayed[:FRAMES].float() - exact[:FRAMES]).abs()
    mean_ratio = num(replay_error.mean()) / max(num(eager_error.mean()), 1e-30)
    max_ratio = num(replay_error.max()) / max(num(eager_error.max()), 1e-30)
    out["replay_over_eager_error_vs_fp32"] = {"mean": mean_ratio, "max": max_ratio}
    # The quantities tests/gpu/test_graphs_gpu.py asserts, with its limits.
    criteria = {
        "eager_vs_fp32_sigmoid_max_x255": (out["eager_fp16_vs_fp32"]["sigmoid_max_x255"], 2.0),
        "replay_vs_fp32_sigmoid_max_x255": (out["replay_vs_fp32"]["sigmoid_max_x255"], 2.0),
        "replay_vs_eager_sigmoid_max_x255": (out["replay_vs_eager"]["sigmoid_max_x255"], 2.0),
        "replay_over_eager_mean_error_vs_fp32": (mean_ratio, 1.5),
        "replay_vs_eager_matte_1080p_max_levels": (
            out["replay_vs_eager_mattes_1080p"]["max_levels"],
            2,
        ),
    }
    out["test_criteria"] = {
        name: {"value": value, "limit": limit, "holds": value <= limit}
        for name, (value, limit) in criteria.items()
    }
    return out


def section_g(case: Case) -> dict[str, Any]:
    recorder = Recorder(case.model.model)
    try:
        recorder.active = True
        case.run_eager()
        eager = recorder.take()
        case.run_eager()
        eager_again = recorder.take()
        recorder.capture_only = True  # not the warm-up runs, only the capture's own copies
        graphs = service_graph(case)
        captured = recorder.take()
        recorder.active = False
        replay(graphs, case)  # refreshes the copies captured into the graph
        torch.cuda.synchronize()
        out = {
            "eager_vs_eager": localize(eager, eager_again),
            "eager_vs_replay": localize(eager, captured),
        }
        del graphs, captured, eager, eager_again
    finally:
        recorder.remove()
        free()
    return out


def section_h(case: Case) -> dict[str, Any]:
    eager = kernels(case.run_eager)
    graphs = service_graph(case)
    ((graph, _, _),) = graphs._graphs.values()
    replayed = kernels(graph.replay)
    del graphs, graph
    free()
    only_eager = eager - replayed
    only_replay = replayed - eager
    out: dict[str, Any] = {
        "eager_kernels": sum(eager.values()),
        "replay_kernels": sum(replayed.values()),
        "distinct_eager": len(eager),
        "distinct_replay": len(replayed),
        "launches_only_in_eager": sum(only_eager.values()),
        "launches_only_in_replay": sum(only_replay.values()),
        "only_in_eager": dict(only_eager.most_common(LIST_LIMIT)),
        "only_in_replay": dict(only_replay.most_common(LIST_LIMIT)),
    }
    if not replayed:
        out["note"] = "the profiler recorded no kernels inside the graph replay"
    return out


def section_j(case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, byte in (("nan_bytes", 0xFF), ("ones", 0x3C)):
        filled = poison_free_blocks(case.device, byte)
        out[label] = {
            "bytes_filled": filled,
            "eager_vs_eager": compare(case.run_eager(), case.eager),
        }
    return out


def poison_free_blocks(device: torch.device, byte: int) -> int:
    """Fill the caching allocator's free blocks (outside graph pools) with ``byte``."""
    torch.cuda.synchronize()
    index = device.index if device.index is not None else torch.cuda.current_device()
    held: list[Tensor] = []
    filled = 0
    for segment in torch.cuda.memory_snapshot():
        if segment.get("device") != index:
            continue
        if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0):
            continue
        for block in segment.get("blocks", []):
            if block.get("state") != "inactive":
                continue
            try:
                tensor = torch.empty(int(block["size"]), dtype=torch.uint8, device=device)
            except torch.cuda.OutOfMemoryError:
                break
            tensor.fill_(byte)
            held.append(tensor)
            filled += tensor.numel()
    torch.cuda.synchronize()
    del held
    return filled


# --- the run ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    cuda = torch.backends.cuda
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "env": {name: os.environ.get(name) for name in ENV_VARS},
    }
    probes: dict[str, Callable[[], object]] = {
        "device": lambda: torch.cuda.get_device_name(0),
        "sm_count": lambda: torch.cuda.get_device_properties(0).multi_processor_count,
        "fp16_reduced_precision_reduction": lambda: (
            cuda.matmul.allow_fp16_reduced_precision_reduction
        ),
        "fp16_split_k": lambda: cuda.matmul.allow_fp16_reduced_precision_reduction_split_k,
        "cublas_workspace_bytes": lambda: cuda.cublas_workspace_size(),
        "cublaslt_workspace_bytes": lambda: cuda.cublaslt_workspace_size(),
        "preferred_blas_library": lambda: str(cuda.preferred_blas_library()),
        "cudnn_benchmark": lambda: torch.backends.cudnn.benchmark,
        "cudnn_deterministic": lambda: torch.backends.cudnn.deterministic,
        "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
        "sdp_enabled": lambda: {
            "cudnn": cuda.cudnn_sdp_enabled(),
            "flash": cuda.flash_sdp_enabled(),
            "efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(),
        },
        "transformers": lambda: __import__("transformers").__version__,
        "torchvision": lambda: __import__("torchvision").__version__,
    }
    for name, probe in probes.items():
        try:
            out[name] = probe()
        except Exception as exc:
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def conclusions(result: dict[str, Any]) -> list[str]:
    """The measurements read back in words (each line names the section it comes from)."""
    lines: list[str] = []

    def get(*path: str) -> Any:
        node: Any = result
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    runs = [v for k, v in (get("a") or {}).items() if k.startswith("eager_run_")]
    if runs:
        if all(r["bitwise_equal"] for r in runs):
            lines.append("a: eager is bitwise deterministic run to run.")
        else:
            worst = max(r["max_abs"] for r in runs)
            lines.append(
                f"a: eager is NOT deterministic (max {worst:.4g}): graphs are not needed to see "
                "a difference; g.eager_vs_eager names the modules."
            )
    side = get("b", "fresh_side_stream_vs_default_stream")
    if side:
        lines.append(
            "b: eager on a side stream "
            + (
                "gives the same bits."
                if side["bitwise_equal"]
                else f"differs (max {side['max_abs']:.4g})."
            )
        )
    for key, label in (
        ("service_capture_replay_vs_eager", "the service's capture"),
        ("no_warm_up_replay_vs_eager", "a capture with no warm-up"),
        ("warm_up_on_capture_stream_replay_vs_eager", "a warm-up on the capture stream"),
    ):
        row = get("c", key)
        if row:
            state = (
                "equals eager" if row["bitwise_equal"] else f"differs (max {row['max_abs']:.4g})"
            )
            lines.append(f"c: replay after {label} {state}.")
    if get("c", "test_sequence", "replay_after_fp32_recompute_vs_before", "bitwise_equal") is False:
        lines.append("c: the replay after the FP32 recompute is not bitwise the replay before it.")
    switches = get("e") or {}
    equal = [n for n, r in switches.items() if get("e", n, "replay_vs_eager", "bitwise_equal")]
    unstable = [
        n for n, r in switches.items() if get("e", n, "eager_vs_eager", "bitwise_equal") is False
    ]
    if switches:
        lines.append(f"e: replay equals eager bitwise under: {equal or 'none of the switches'}.")
        if unstable:
            lines.append(f"e: eager is not deterministic under: {unstable}.")
    origin = get("g", "eager_vs_replay", "first_different_output")
    if origin:
        lines.append(
            f"g: the first module output that differs in replay is {origin['module']} "
            f"({origin['type']}, max {origin['output_max_abs']})."
        )
        types = get("g", "eager_vs_replay", "deepest_origin_types")
        lines.append(f"g: differences start inside (deepest, same input): {types}.")
    elif get("g", "eager_vs_replay", "calls_with_different_output") == 0:
        lines.append("g: with hooks on every module, replay and eager agree bit for bit.")
    only_e, only_r = get("h", "launches_only_in_eager"), get("h", "launches_only_in_replay")
    if only_e is not None:
        lines.append(
            f"h: {only_e} kernel launches only in eager, {only_r} only in replay "
            "(same kernels: a difference is not kernel selection)."
            if only_e == only_r == 0
            else f"h: {only_e} kernel launches only in eager, {only_r} only in replay: "
            "see h.only_in_eager / h.only_in_replay for which."
        )
    criteria = get("f", "test_criteria")
    if criteria:
        failing = [n for n, c in criteria.items() if not c["holds"]]
        lines.append(
            "f: every quantity the test asserts is within its limit."
            if not failing
            else f"f: outside the test's limits: {failing}."
        )
    poisoned = [
        label
        for label in ("nan_bytes", "ones")
        if get("j", label, "eager_vs_eager", "bitwise_equal") is False
    ]
    if get("j"):
        lines.append(
            f"j: eager changes when free memory holds {poisoned}: a kernel reads memory it "
            "never wrote."
            if poisoned
            else "j: poisoning free memory changes nothing: no reads of unwritten memory seen."
        )
    return lines


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--out", default=None, help="write the JSON here (after every section)")
    parser.add_argument(
        "--sections", default=SECTIONS, help=f"letters of the sections to run (default {SECTIONS})"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=110.0,
        help="start no section after this many seconds (0: no limit)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s if args.budget_s > 0 else math.inf
    result: dict[str, Any] = {
        "command": "python -m benchmarks.graph_diff " + " ".join(argv or sys.argv[1:]),
        "environment": environment(),
    }

    def write() -> None:
        result["conclusions"] = conclusions(result)
        result["seconds"] = round(time.perf_counter() - started, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(jsonable(result), indent=2))

    if not torch.cuda.is_available():
        result["error"] = "needs a CUDA GPU"
        write()
        print(json.dumps(jsonable(result), indent=2))
        return 2
    sdpa = SdpaChoices()
    sdpa.install()
    try:
        with torch.inference_mode():
            build_started = time.perf_counter()
            try:
                case = Case(args.rmbg_dir)
            except Exception as exc:
                result["error"] = f"building the model failed: {type(exc).__name__}: {exc}"
                result["traceback"] = traceback.format_exc(limit=12)
                write()
                print(json.dumps(jsonable(result), indent=2))
                return 1
            result["build_seconds"] = round(time.perf_counter() - build_started, 1)
            sections: dict[str, Callable[[], dict[str, Any]]] = {
                "a": lambda: section_a(case),
                "b": lambda: section_b(case),
                "c": lambda: section_c(case, sdpa),
                "f": lambda: section_f(case),
                "g": lambda: section_g(case),
                "h": lambda: section_h(case),
                "j": lambda: section_j(case),
                "e": lambda: section_e(case, sdpa, deadline),
            }
            for letter in SECTIONS:  # this order: the cheap and telling ones first
                if letter not in args.sections or letter not in sections:
                    continue
                if time.perf_counter() > deadline:
                    result[letter] = {"skipped": "time budget"}
                    continue
                sdpa.label = letter
                section_started = time.perf_counter()
                try:
                    result[letter] = sections[letter]()
                except Exception as exc:
                    result[letter] = {
                        "error": f"{type(exc).__name__}: {exc}"[:800],
                        "traceback": traceback.format_exc(limit=12),
                    }
                result[letter]["seconds"] = round(time.perf_counter() - section_started, 1)
                try:
                    free()
                except Exception as exc:  # a broken context: later sections record their errors
                    result[letter]["free_error"] = f"{type(exc).__name__}: {exc}"[:400]
                write()
                print(f"section {letter}: {result[letter]['seconds']} s", file=sys.stderr)
            if "i" in args.sections:
                result["i"] = sdpa.summary()
    finally:
        sdpa.remove()
    write()
    print(json.dumps(jsonable(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
