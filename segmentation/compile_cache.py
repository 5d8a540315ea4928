"""Compiled RMBG-2.0 blocks and decoder built once and reused (``RMBG_COMPILE_CACHE``).

``RMBG_COMPILE`` compiles parts of the fast path with Inductor when a replica starts: the Swin
block body (``true`` or ``blocks``), the whole decoder (``decoder``), or both: minutes on a
cold cache (168 s of replica start-up for the blocks on an H100, docs/benchmarks.md).
Inductor keeps what it compiled on the local disk, so a second start on the same machine is
quicker, but a new machine, pod or container starts cold again. An *artifact* packs those
caches (PyTorch's portable compile caches, ``torch.compiler.save_cache_artifacts``) into one
file that is built once, copied with the weights, and loaded before the model compiles, so
Inductor finds every graph it needs and only traces.

An artifact is valid only for what it was compiled from, so its file name is a key over:
the torch (and Triton) version, the device (GPU name and compute capability, or ``cpu``),
the dtype, the input size, the fast path's steps and the linear format, the source of the
fast path and of the model's own code (``birefnet.py`` and friends), and the weights'
sha256 (``random`` for random weights). Any of them changing gives another key, so a stale
artifact is never loaded: it is just not found.

With ``RMBG_COMPILE_CACHE`` set, a replica whose artifact is there loads it and compiles
from it; one whose artifact is missing does not compile at all (the fast path runs
uncompiled, ready as quickly as without ``RMBG_COMPILE``) and says so in ``/v1/models``
(``compile``: the key, the file it looked for, the command that builds it). A loaded
artifact is no promise: ``compile`` also counts the graphs found in the caches and those
compiled anyway (``inductor_cache``), so a key that missed something shows as misses.

An artifact holds compiled code that the process runs: load only artifacts you built (a
directory as trusted as the code itself, unlike the weights' safetensors). Build one on a
machine with the same GPU and software, with the settings the replicas use::

    RMBG_MODEL=/models/RMBG-2.0 RMBG_COMPILE=true \\
        python -m segmentation.compile_cache /models/compiled --max-batch-size 16

``--ahead-of-time`` also compiles each Swin block geometry into an AOTInductor package
(``<key>.aoti`` beside the artifact, :mod:`segmentation.models.rmbg20_blocks`): a replica that
can load them traces nothing at start-up; one whose torch cannot load them says why in
``/v1/models`` (``compile.programs``) and uses the artifact.

It runs the batch sizes a replica warms up with, in its order (:func:`warmup_order`): the
graphs compiled depend on the order. On a CPU with the published architecture at 128 pixels
(2026-11-28), a fresh process running batches 1 then 2 found all 16 of its graphs in the
artifact built that way; running batch 2 alone, 7 of 9.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: File name suffix of an artifact of Inductor's caches: ``<key>.inductor``.
SUFFIX = ".inductor"
#: Directory name suffix of ahead-of-time compiled block programs: ``<key>.aoti``.
AOT_SUFFIX = ".aoti"
#: Characters of the sha256 hex digest kept in the key.
KEY_LENGTH = 32


def artifact_key(parts: Mapping[str, Any]) -> str:
    """The key of ``parts`` (what the compiled code depends on): sha256 of their canonical
    JSON, shortened."""
    text = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def code_digest(files: Iterable[Path]) -> str:
    """sha256 over the names and bytes of ``files`` (sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def device_identity(device: torch.device) -> str:
    """What compiled kernels depend on in the device: the GPU's name and compute
    capability, or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def software_identity() -> str:
    """torch's version, and Triton's and torchao's where installed (Triton generates the GPU
    kernels; torchao's tensors are in the FP8/INT8 graphs)."""
    from importlib.metadata import PackageNotFoundError, version

    found = [f"torch {torch.__version__}"]
    for package in ("triton", "torchao"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{package} {version(package)}")
    return ", ".join(found)


def project_code() -> list[Path]:
    """The project's code the compiled blocks run: the fast path, the attention-mask casting
    the loader installs, the quantized layers."""
    here = Path(__file__).parent
    return [
        here / "models" / "rmbg20_fast.py",
        here / "models" / "rmbg20_blocks.py",
        here / "models" / "rmbg20_loader.py",
        here / "quantize.py",
    ]


def model_files(model_dir: Path) -> list[Path]:
    """The model's own code and configuration (``*.py``, ``config.json``)."""
    return sorted([*model_dir.glob("*.py"), *model_dir.glob("config.json")])


def inductor_counts() -> dict[str, int]:
    """This process's Inductor FX-graph cache hits and misses so far."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {
        "hits": int(inductor["fxgraph_cache_hit"]),
        "misses": int(inductor["fxgraph_cache_miss"]),
    }


def key_parts(
    *,
    model_code: Iterable[Path],
    fast_path_code: Iterable[Path],
    weights_sha256: str | None,
    device: torch.device,
    dtype: torch.dtype,
    input_size: int,
    steps: Sequence[str],
    linear_format: str | None,
) -> dict[str, str]:
    """Everything an artifact is valid for (see the module's docstring)."""
    return {
        "software": software_identity(),
        "device": device_identity(device),
        "dtype": str(dtype),
        "input_size": str(input_size),
        "steps": "+".join(steps),
        "linear_format": linear_format or "none",
        "fast_path_code": code_digest(fast_path_code),
        "model_code": code_digest(model_code),
        "weights": weights_sha256 or "random",
    }


def ahead_of_time(linear_format: str | None) -> bool:
    """Whether blocks of this linear format can run ahead-of-time programs
    (:mod:`segmentation.models.rmbg20_blocks`): plain weights; FP8 and INT8 weights are
    tensor subclasses a program cannot take as inputs, and keep Inductor's caches."""
    return linear_format is None


def artifact_path(directory: str | Path, key: str, *, ahead: bool = False) -> Path:
    return Path(directory) / f"{key}{AOT_SUFFIX if ahead else SUFFIX}"


def load_artifact(path: Path) -> int:
    """Fill this process's compile caches from the artifact at ``path``; its size in bytes.
    Call it before anything compiles. ValueError when torch cannot read it."""
    data = path.read_bytes()
    # torch logs a file it cannot read (corrupt, or from another torch) and returns None
    if torch.compiler.load_cache_artifacts(data) is None:
        raise ValueError(f"{path} is not a compile cache artifact torch {torch.__version__} reads")
    logger.info("loaded compiled artifact %s (%d bytes)", path, len(data))
    return len(data)


def shared_mode(mode: int) -> int:
    """``mode`` less this process's umask: what a plain ``open`` or ``mkdir`` would give,
    where ``mkstemp`` and ``mkdtemp`` give their owner alone (replicas may run as another
    user than the builder)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def save_artifact(path: Path) -> int:
    """Write what this process compiled so far to ``path`` (atomically: a replica reading
    the directory never sees half a file); its size in bytes. ValueError when nothing was
    compiled."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise ValueError("nothing was compiled in this process: no artifact to save")
    data, _info = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, shared_mode(0o666))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info("saved compiled artifact %s (%d bytes)", path, len(data))
    return len(data)


def warmup_order(max_batch_size: int) -> list[int]:
    """The batch sizes a replica first runs, in its order (a batch of 1, the largest, then
    the other sizes it pads to): the graphs compiled depend on the order (the batch size is
    made symbolic at the first batch that compiles; a batch of 1 runs uncompiled), so the
    artifact is built in it."""
    from segmentation.batching import batch_buckets

    first = [1, max_batch_size] if max_batch_size > 1 else [1]
    return first + [size for size in batch_buckets(max_batch_size) if size not in first]


def build_command(directory: str | Path) -> str:
    """The command that builds the artifacts of ``directory`` (for messages)."""
    return f"python -m segmentation.compile_cache {directory}"


def main(argv: list[str] | None = None) -> int:
    from segmentation.batching import batch_buckets
    from segmentation.config import load_settings
    from segmentation.factory import build_segmentor
    from segmentation.models import rmbg20_blocks, rmbg20_fast

    parser = argparse.ArgumentParser(
        description="Build RMBG-2.0's compiled artifact for the settings in the environment "
        "(RMBG_MODEL, DEVICE, USE_FP16, RMBG_INPUT_SIZE, USE_FP8/USE_INT8, RMBG_COMPILE: the "
        "blocks when it is unset or false) into DIRECTORY, "
        "the RMBG_COMPILE_CACHE the replicas will use. Give it what the application's args "
        "change (--input-size, --load-format) and its max_batch_size: a replica finds only "
        "the artifact of exactly what it runs, and a replica without one says so in "
        "/v1/models."
    )
    parser.add_argument("directory", help="where the artifact goes (RMBG_COMPILE_CACHE)")
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="batch sizes to run, in order (default: a replica's warm-up order up to "
        "--max-batch-size)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="the replicas' max_batch_size (their largest batch: a compiled decoder's graph is "
        "for it; a replica whose memory caps it lower compiles its own)",
    )
    parser.add_argument(
        "--ahead-of-time",
        action="store_true",
        help="also compile the Swin blocks ahead of time (AOTInductor, <key>.aoti beside the "
        "artifact; plain linear layers only): a replica that loads them traces nothing",
    )
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    parser.add_argument(
        "--input-size", type=int, default=None, help="the application's rmbg input_size"
    )
    args = parser.parse_args(argv)
    try:
        sizes = (
            [int(size) for size in args.batch_sizes.split(",")]
            if args.batch_sizes
            else warmup_order(args.max_batch_size)
        )
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: comma-separated integers, e.g. 1,16,8")
    if not 1 <= min(sizes) <= max(sizes) <= args.max_batch_size:
        parser.error(f"--batch-sizes {sizes}: each from 1 to --max-batch-size")
    if max(sizes) < rmbg20_blocks.MIN_BATCH:
        parser.error(
            f"{'--batch-sizes' if args.batch_sizes else '--max-batch-size'} 1 compiles nothing "
            "(a single frame runs the blocks uncompiled)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # What RMBG_COMPILE names (the blocks when it is unset: the tool builds something).
    compiled = load_settings(rmbg_optimized=True).rmbg_compile or True
    settings = load_settings(
        rmbg_compile=compiled, rmbg_optimized=True, rmbg_compile_cache=args.directory
    )
    if "decoder" in settings.rmbg_compile and args.max_batch_size not in sizes:
        parser.error(
            f"--batch-sizes {sizes}: the decoder compiles for --max-batch-size "
            f"({args.max_batch_size}), the replicas' largest batch: include it"
        )
    blocks = "blocks" in settings.rmbg_compile
    ahead = args.ahead_of_time and blocks and ahead_of_time(settings.linear_format)
    if args.ahead_of_time and not blocks:
        parser.error("--ahead-of-time compiles the Swin blocks: RMBG_COMPILE must include blocks")
    if args.ahead_of_time and not ahead:
        logger.warning("--ahead-of-time: FP8 and INT8 linear layers use the artifact only")
    if ahead and rmbg20_blocks.MIN_BATCH not in sizes:
        parser.error(
            f"--ahead-of-time records the blocks at a batch of {rmbg20_blocks.MIN_BATCH}: "
            f"include {rmbg20_blocks.MIN_BATCH} in --batch-sizes, or leave them out (a "
            "replica's warm-up order)"
        )
    segmentor = build_segmentor(
        "rmbg",
        settings,
        load_format=args.load_format,
        input_size=args.input_size,
        compile_artifacts="build",
    )
    status = getattr(segmentor, "compile_status", None) or {}
    if not rmbg20_fast.COMPILED_STEPS.keys() & set(getattr(segmentor, "fast_steps", ())):
        raise SystemExit(f"nothing to build: {status.get('state', 'nothing compiled')}")
    side = args.input_size or settings.rmbg_input_size
    frame = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    path = Path(status["artifact"])
    calls: list[rmbg20_blocks.BlockCall] = []
    # The sizes a replica pads to (a compiled decoder compiles for the largest only).
    segmentor.batch_buckets = batch_buckets(args.max_batch_size)
    with contextlib.ExitStack() as stack:
        if ahead:
            calls = stack.enter_context(rmbg20_blocks.recorded_calls(segmentor.model))
        for size in sizes:
            segmentor.predict([frame] * size)
            logger.info("compiled batch %d", size)
    built: dict[str, Any] = {"artifact": str(path), "key": status["key"]}
    built["bytes"] = save_artifact(path)
    if ahead:
        programs = artifact_path(args.directory, status["key"], ahead=True)
        if not calls:
            raise SystemExit(
                "no programs to build: no Swin block the programs compute ran (blocks with "
                "other layers keep the artifact)"
            )
        rmbg20_blocks.export_programs(calls, programs, args.max_batch_size)
        built["programs"] = str(programs)
        built["programs_bytes"] = sum(file.stat().st_size for file in programs.iterdir())
    print(json.dumps(built))
    return 0


if __name__ == "__main__":
    sys.exit(main())
