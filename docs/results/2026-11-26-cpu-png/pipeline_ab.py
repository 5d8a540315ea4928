"""segment-video's PNG writer (preset fast, zlib level 1) with Pillow vs FFmpeg's encoder, on
32 synthetic 1080p frames with synthetic mattes: frames/s, encoder busy seconds, bytes.

    PYTHONPATH=. python docs/results/2026-11-26-cpu-png/pipeline_ab.py
"""

import asyncio
import tempfile
import time
from pathlib import Path

from benchmarks.video_bench import SyntheticMattes, synthetic_clip
from segmentation_client.segment_video import segment_frames
from segmentation_client.video import PngSequenceWriter, StageTimer, VideoReader

workdir = Path(tempfile.mkdtemp())
clip = workdir / "clip.mp4"
synthetic_clip(clip, 1920, 1080, 32)
for round_ in range(2):
    for use_ffmpeg in (False, True):
        out = workdir / f"out-{round_}-{use_ffmpeg}"
        timer = StageTimer()
        with VideoReader(clip) as reader:
            writer = PngSequenceWriter(out, {}, preset="fast", timer=timer)
            writer._fast = use_ffmpeg  # False: Pillow at the same zlib level
            started = time.perf_counter()
            mattes = SyntheticMattes(chunk=8)
            stats = asyncio.run(segment_frames(iter(reader), mattes, writer, timer=timer))
            writer.close()
            elapsed = time.perf_counter() - started
        size = sum(p.stat().st_size for p in out.glob("frame_*.png"))
        name = "ffmpeg" if use_ffmpeg else "pillow"
        busy = round(timer.seconds["encode"], 2)
        fps = round(stats.processed / elapsed, 1)
        print(f"{name} level 1: {fps} frames/s encode busy {busy} bytes {size}")
