"""segment-video's in-process pipeline on a GPU: decode (PyAV), RMBG-2.0 FP16, RGBA out.

Generates a 1080p H.264 clip, then runs the same code path as ``segment-video INPUT -o DIR``
(and ``-o FILE.webm``) with the published RMBG-2.0 architecture and random weights:

    python -m benchmarks.video_bench --rmbg-dir third_party/rmbg20 --frames 96 --out video.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.model_bench import frames_1080p
from segmentation.config import Settings
from segmentation.factory import build_segmentor
from segmentation.local import LocalSegmenter
from segmentation_client.segment_video import LocalMatter, open_writer, segment_frames
from segmentation_client.video import VideoReader
from tests.conftest import write_video


def run_once(clip: Path, output: Path, segmenter: LocalSegmenter, batch: int) -> dict[str, Any]:
    with VideoReader(clip) as reader:
        writer = open_writer(str(output), reader, {"bench": True}, overwrite=True)
        started = time.perf_counter()
        done, _ = asyncio.run(
            segment_frames(iter(reader), LocalMatter(segmenter, chunk=batch), writer)
        )
        writer.close()
        elapsed = time.perf_counter() - started
    return {
        "output": output.suffix or "png-sequence",
        "batch": batch,
        "frames": done,
        "seconds": round(elapsed, 2),
        "frames_per_s": round(done / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rmbg-dir", default="third_party/rmbg20")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    settings = Settings(rmbg_trust_remote_code=True)
    segmentor = build_segmentor(
        "rmbg", settings, model=str(Path(args.rmbg_dir).resolve()), load_format="dummy"
    )
    segmenter = LocalSegmenter("rmbg", segmentor, batch_size=args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        sources = frames_1080p(8)
        write_video(clip, [sources[i % 8] for i in range(args.frames)], fps=30, codec="libx264")
        segmenter(sources[: args.batch])  # warm-up
        for output in (Path(tmp) / "frames", Path(tmp) / "cutout.webm", Path(tmp) / "cutout.mov"):
            rows.append(run_once(clip, output, segmenter, args.batch))
            print(rows[-1], flush=True)
    result = {
        "command": "python -m benchmarks.video_bench " + " ".join(argv or sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "precision": segmentor.precision.name,
        "runs": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
