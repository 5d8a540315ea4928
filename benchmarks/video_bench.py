"""segment-video end to end: frames/s and time to first frame per output format and mode.

Generates an H.264 clip, then runs the ``segment-video`` command itself, in a fresh process
per row (so the time to first frame counts imports, model build and the first batch), once
per output: a PNG directory, ``.webm`` (VP9 + alpha) and ``.mov`` (ProRes 4444). Rows:

- ``model``: the model alone on the clip's decoded frames at ``--batch`` (steady state, after
  one warm-up batch, and the capture with ``cuda_graphs``): the pace every other row is
  measured against (``vs_model``; ``vs_model_after_first_batch`` for the pace once
  running). It runs the model as the service does (cuDNN attention); the command's own
  model uses quick-start attention on clips shorter than 1400 frames (2.3% slower once
  running, see ``segmentation.local.LocalRunner``).
- ``in-process``: ``segment-video CLIP -o OUT --batch-size B --encode P`` (the model in the
  command's process), per ``--cuda-graphs`` variant (``off``, ``on``: the command's
  ``--cuda-graphs``) and per clip length in ``--frames`` (e.g. ``120,600``: a capture pays
  off only on a longer clip).
- ``server``: the same with ``--server URL`` (a service started elsewhere; no model row).
- ``encode-only``: the command's decode / write pipeline with synthetic mattes (no model), at
  every ``--encode`` preset: how fast each format and preset can go on this machine.

Each row carries frames/s (whole run, and after the first batch), time to first frame, the
start-up breakdown and each stage's busy seconds (from ``segment-video --report``). On a GPU
(H100: about 3 minutes, RMBG-2.0 with random weights from the published architecture in
``third_party/rmbg20``):

    python -m benchmarks.video_bench --model-path third_party/rmbg20 --load-format dummy \\
        --width 1920 --height 1080 --frames 120 --batch 16 --out video.json

A smoke test on the CPU with the stand-in, at a small size (about 2 minutes on 2 cores):

    python -m benchmarks.video_bench --model-path standin:tiny-birefnet --device cpu \\
        --width 320 --height 240 --frames 16 --batch 4

Through a running service: ``--server http://localhost:8000`` (server and encode-only rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmentation_client.segment_video import segment_frames
from segmentation_client.video import DEFAULT_ENCODE, ENCODE_PRESETS, StageTimer, VideoReader

OUTPUTS = {"png": "frames", "webm": "cutout.webm", "mov": "cutout.mov"}
CHILD_FLAG = "--as-segment-video"


def synthetic_clip(path: Path, width: int, height: int, frames: int) -> None:
    """An H.264 clip of ``frames`` product-like frames (8 distinct ones, repeated)."""
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    sources = []
    for seed in range(8):
        frame = rng.normal(200, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
        cx = width / 2 + width / 10 * np.sin(seed)
        inside = ((xx - cx) / (width / 5)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 <= 1
        frame[inside] = (40 + 20 * seed, 90, 160)
        sources.append(frame)
    with av.open(str(path), mode="w") as container:
        stream: Any = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = av.VideoFrame.from_ndarray(sources[i % 8], format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))


@dataclass
class SyntheticMattes:
    """Elliptic mattes with soft edges that move from frame to frame; no model."""

    chunk: int = 8
    window: int = 2

    async def mattes(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for frame in frames:
            height, width = frame.shape[:2]
            yy, xx = np.ogrid[0:height, 0:width]
            cx = width / 2 + width / 8 * np.sin(float(frame[0, 0, 0]))
            r = ((xx - cx) / (width / 4)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2
            out.append(np.clip((1.2 - r) * 600, 0, 255).astype(np.uint8))
        return out


def encode_only(clip: Path, output: Path, preset: str, batch: int) -> dict[str, Any]:
    from segmentation_client.segment_video import open_writer

    timer = StageTimer()
    with VideoReader(clip) as reader:
        writer = open_writer(str(output), reader, {}, True, preset=preset, timer=timer)  # type: ignore[arg-type]
        started = time.perf_counter()
        stats = asyncio.run(
            segment_frames(iter(reader), SyntheticMattes(chunk=batch), writer, timer=timer)
        )
        writer.close()
        elapsed = time.perf_counter() - started
    return {
        "frames": stats.processed,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(stats.processed / elapsed, 2),
        "time_to_first_frame": round(stats.first_written - started, 3)
        if stats.first_written
        else None,
        "stages": {k: round(v, 3) for k, v in timer.seconds.items()},
        "bytes": _size(output),
    }


def model_alone(args: argparse.Namespace, clip: Path, graphs: bool) -> dict[str, Any]:
    """The model's own frames/s at ``--batch`` on the clip's frames (after one warm-up batch
    and, with ``graphs``, a second one that captures the CUDA graph)."""
    import torch

    from benchmarks.checked import release_memory
    from segmentation.config import load_settings
    from segmentation.factory import build_segmentor
    from segmentation.local import LocalRunner

    with VideoReader(clip) as reader:
        frames = list(reader)
    segmentor = build_segmentor(
        args.model,
        load_settings(rmbg_trust_remote_code=True),
        model=_model_path(args.model_path),
        device=args.device,
        load_format=args.load_format,
    )
    runner = LocalRunner(args.model, segmentor, batch_size=args.batch, cuda_graphs=graphs)
    runner(frames[: args.batch])  # cuDNN plans for this batch size
    if graphs:
        runner(frames[: args.batch])  # the capture, then a replay
    sync = torch.cuda.synchronize if segmentor.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for start in range(0, len(frames), args.batch):
        runner(frames[start : start + args.batch])
    sync()
    elapsed = time.perf_counter() - started
    row = {
        "frames": len(frames),
        "seconds": round(elapsed, 3),
        "frames_per_s": round(len(frames) / elapsed, 2),
        "precision": segmentor.precision.name,
        "inference_path": segmentor.info().inference_path,
        "device": torch.cuda.get_device_name(0) if segmentor.device.type == "cuda" else "cpu",
    }
    del runner, segmentor
    release_memory()
    return row


def with_weights(model_path: str, workdir: Path) -> Path:
    """A copy of the model directory at ``model_path`` with random weights (seed 0) in its
    weights file, so the rows load weights from local disk as a real run does (the file was
    just written: the page cache holds it, as after a first run)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from segmentation.models.rmbg20_loader import WEIGHTS_FILE, build_model

    target = workdir / "rmbg-with-weights"
    shutil.copytree(model_path, target, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = build_model(target, load_weights=False, device=device).state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, target / WEIGHTS_FILE)
    return target


def command(
    args: argparse.Namespace,
    clip: Path,
    output: Path,
    preset: str,
    server: str | None,
    graphs: bool = False,
) -> dict[str, Any]:
    """One ``segment-video`` run in a fresh process (through ``server`` if given); its
    ``--report``."""
    report = output.with_name(output.name + ".report.json")
    argv = [str(clip), "-o", str(output), "--overwrite", "--no-progress", "--encode", preset]
    argv += ["--model", args.model]
    argv += ["--report", str(report)]
    if server:
        argv += ["--server", server, "--concurrency", str(args.concurrency)]
    else:
        argv += ["--model-path", _model_path(args.model_path), "--batch-size", str(args.batch)]
        if args.device:
            argv += ["--device", args.device]
        if graphs:
            argv += ["--cuda-graphs"]
    env = dict(os.environ, RMBG_TRUST_REMOTE_CODE="1")
    child = [sys.executable, "-m", "benchmarks.video_bench", CHILD_FLAG, args.load_format]
    done = subprocess.run([*child, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"segment-video {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(report.read_text())
    report.unlink()
    keep = (
        "frames",
        "seconds",
        "frames_per_s",
        "frames_per_s_after_first_batch",
        "time_to_first_frame",
        "startup",
        "stages",
    )
    return {**{k: result[k] for k in keep}, "bytes": _size(output)}


def output_row(
    args: argparse.Namespace,
    clip: Path,
    name: str,
    workdir: Path,
    server: str | None,
    model_fps: Any,
    graphs: bool = False,
) -> dict[str, Any]:
    """A ``segment-video`` row for output format ``name``, in-process (``graphs``: with
    ``--cuda-graphs``) or through ``server``."""
    row = command(args, clip, workdir / OUTPUTS[name], DEFAULT_ENCODE, server, graphs)
    if model_fps:
        row["vs_model"] = round(row["frames_per_s"] / model_fps, 3)
        if row.get("frames_per_s_after_first_batch"):
            pace = row["frames_per_s_after_first_batch"]
            row["vs_model_after_first_batch"] = round(pace / model_fps, 3)
    mode = "server" if server else "in-process"
    head = {"mode": mode, "model": args.model, "output": name, "encode": DEFAULT_ENCODE}
    head["batch"] = args.batch
    if not server:
        head["cuda_graphs"] = graphs
    return {**head, **row}


@contextlib.contextmanager
def served(args: argparse.Namespace, workdir: Path) -> Iterator[dict[str, str]]:
    """A local cluster serving ``--serve-config`` with RMBG-2.0 at ``--model-path``; yields
    each transport's address for ``segment-video --server``."""
    from tests.serve_cluster import running_cluster  # Ray: only this mode needs it

    def edit(config: dict[str, Any]) -> None:
        rmbg = config["applications"][0]["args"]["rmbg"]
        rmbg["model"] = _model_path(args.model_path)
        rmbg["load_format"] = args.load_format

    with running_cluster(
        Path(args.serve_config),
        workdir,
        num_cpus=os.cpu_count() or 4,
        num_gpus=args.gpus,
        edit=edit,
    ) as cluster:
        yield {"http": cluster.url, "grpc": f"grpc://{cluster.grpc_target}"}


def _as_segment_video(load_format: Any, argv: list[str]) -> int:
    """``segment-video argv``, with ``load_format`` for the model (``dummy``: random weights,
    so the published architecture can be timed without its licensed weights)."""
    import functools

    import segmentation.factory
    from segmentation_client.segment_video import main

    build = segmentation.factory.build_segmentor
    dummy: Any = functools.partial(build, load_format=load_format)
    segmentation.factory.build_segmentor = dummy
    return main(argv)


def _model_path(path: str) -> str:
    return (
        path
        if path.startswith("standin:") or not Path(path).exists()
        else str(Path(path).resolve())
    )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("frame_*.png"))
    return path.stat().st_size if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_FLAG]:
        return _as_segment_video(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=("rmbg", "yolo"), default="rmbg")
    parser.add_argument(
        "--model-path",
        default="third_party/rmbg20",
        help="RMBG-2.0's directory, or for --model yolo e.g. yolo11n-seg.yaml",
    )
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--with-weights",
        action="store_true",
        help="write random weights (seed 0) next to a copy of --model-path's code and load "
        "them (load format auto): the time to first frame with the weights on local disk",
    )
    parser.add_argument("--server", help="service URL: server and encode-only rows")
    parser.add_argument(
        "--serve-config",
        help="start a local Ray cluster with this Serve config (e.g. configs/gpu-bench.yaml, "
        "its RMBG-2.0 at --model-path) and add server rows through it, per --transports",
    )
    parser.add_argument("--transports", default="http,grpc", help="with --serve-config")
    parser.add_argument(
        "--server-only",
        action="store_true",
        help="with --serve-config: only the rows through it (no model, in-process or "
        "encode-only rows)",
    )
    parser.add_argument("--gpus", type=int, default=1, help="with --serve-config")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument(
        "--frames", default="120", help="clip length(s) for the in-process rows, e.g. 120,600"
    )
    parser.add_argument(
        "--cuda-graphs",
        default="off",
        help="in-process variants: off, on or off,on (segment-video --cuda-graphs; a model "
        "row for each)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--formats", default="png,webm,mov")
    parser.add_argument(
        "--presets",
        default=",".join(ENCODE_PRESETS),
        help="presets for the encode-only rows (the command rows use the default)",
    )
    parser.add_argument("--encode-frames", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.server_only and not args.serve_config:
        parser.error("--server-only needs --serve-config")
    if args.model != "rmbg" and (args.serve_config or args.with_weights):
        parser.error("--serve-config and --with-weights are for --model rmbg")
    if args.with_weights and not Path(args.model_path).is_dir():
        parser.error(
            f"--with-weights needs the model's directory as --model-path, not {args.model_path!r}"
        )
    if not set(args.cuda_graphs.split(",")) <= {"off", "on"}:
        parser.error(f"--cuda-graphs: expected off, on or off,on, got {args.cuda_graphs!r}")
    formats = args.formats.split(",")
    lengths = [int(n) for n in args.frames.split(",")]
    variants = [{"off": False, "on": True}[v] for v in args.cuda_graphs.split(",")]
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.with_weights:
            args.model_path = str(with_weights(args.model_path, Path(tmp)))
            args.load_format = "auto"
        clips = {n: Path(tmp) / f"clip-{n}.mp4" for n in lengths}
        for frames, path in clips.items():
            synthetic_clip(path, args.width, args.height, frames)
        clip = clips[lengths[0]]
        short = Path(tmp) / "short.mp4"
        synthetic_clip(short, args.width, args.height, min(lengths[0], args.encode_frames))
        model_fps: dict[bool, Any] = {False: None}
        if args.server:
            for name in formats:
                add(output_row(args, clip, name, Path(tmp), args.server, None))
        elif not args.server_only:
            for graphs in variants:
                row = model_alone(args, clip, graphs)
                model_fps[graphs] = row["frames_per_s"]
                head = {"mode": "model", "model": args.model, "output": None, "batch": args.batch}
                add({**head, "cuda_graphs": graphs, **row})
            for path in clips.values():
                for graphs in variants:
                    for name in formats:
                        row = output_row(
                            args, path, name, Path(tmp), None, model_fps[graphs], graphs
                        )
                        add(row)
        if args.serve_config:
            with served(args, Path(tmp)) as targets:
                for transport in args.transports.split(","):
                    for name in formats:
                        server = targets[transport]
                        row = output_row(args, clip, name, Path(tmp), server, model_fps[False])
                        add({**row, "transport": transport})
        for name in formats if not args.server_only else ():
            for preset in args.presets.split(","):
                row = encode_only(short, Path(tmp) / OUTPUTS[name], preset, args.batch)
                add({"mode": "encode-only", "output": name, "encode": preset, **row})
    result = {
        "command": "python -m benchmarks.video_bench " + " ".join(argv),
        "size": [args.width, args.height],
        "cores": len(os.sched_getaffinity(0)),
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
