import asyncio, time, tempfile, os
from pathlib import Path
import segmentation_client.video as video
from benchmarks.video_bench import synthetic_clip, SyntheticMattes
from segmentation_client.segment_video import segment_frames
from segmentation_client.video import VideoReader, StageTimer, PngSequenceWriter
tmp = Path(tempfile.mkdtemp())
clip = tmp / "c.mp4"; synthetic_clip(clip, 1920, 1080, 32)
for rnd in range(2):
    for fast in (False, True):
        out = tmp / f"o{rnd}{fast}"
        timer = StageTimer()
        with VideoReader(clip) as reader:
            w = PngSequenceWriter(out, {}, preset="fast", timer=timer)
            w._fast = fast
            t = time.perf_counter()
            stats = asyncio.run(segment_frames(iter(reader), SyntheticMattes(chunk=8), w, timer=timer))
            w.close(); el = time.perf_counter() - t
        size = sum(p.stat().st_size for p in out.glob("frame_*.png"))
        print("ffmpeg" if fast else "pillow", "level 1:", round(stats.processed / el, 1), "frames/s", "encode busy", round(timer.seconds["encode"], 2), "bytes", size)
