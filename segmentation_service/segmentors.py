"""The two segmentor deployments. Resources, replicas and ``user_config`` come from config.

Each loads its model and says how to run one batch; queueing, batching, OOM and failure
isolation, warm-up and reconfigure are :class:`SegmentorReplica`'s.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from ray import serve

from segmentation import encoders
from segmentation.config import Settings
from segmentation.device_decode import decode_jpegs_on
from segmentation.factory import build_segmentor
from segmentation.imaging import EncodedJPEG, probe_jpeg
from segmentation.models.base import StageClock
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.options import DetectOptions
from segmentation_service.config import SegmentorArgs
from segmentation_service.replica import Pending, SegmentorReplica


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class RMBGDeployment(SegmentorReplica):
    """RMBG-2.0 background removal; answers uint8 alpha mattes (the router encodes PNGs)."""

    name = "rmbg-2.0"

    def load(self, args: SegmentorArgs, settings: Settings) -> RMBG20Segmentor:
        return cast(RMBG20Segmentor, build_segmentor("rmbg", settings, **args.model_overrides()))

    def run_model(self, items: list[Pending]) -> list[np.ndarray]:
        return self.segmentor.predict([item.frame for item in items], self.step_timings)

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        if self.args.cuda_graphs:  # off unless asked for: see SegmentorArgs.cuda_graphs
            self.segmentor.capture_graphs(batch_sizes)

    async def remove_background(
        self, image: bytes | np.ndarray | EncodedJPEG, deadline: float | None = None
    ) -> np.ndarray:
        """The uint8 alpha matte (``HxW``) of one image: decoded RGB array or encoded bytes."""
        if isinstance(image, EncodedJPEG):  # decoded on the CPU: the cutout needs its pixels
            image = image.data
        frame = await self.decode(image)
        alpha: np.ndarray = await self.submit(frame, None, deadline)
        return alpha

    async def remove_background_each(
        self, images: list[np.ndarray], deadline: float | None = None
    ) -> list[np.ndarray | BaseException]:
        """Mattes of many decoded frames; a frame that fails gets its error in its place."""
        return await self.submit_each(images, None, deadline)


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10)
class YoloDeployment(SegmentorReplica):
    """YOLO11-seg instance segmentation; answers JSON-ready dicts with COCO RLE masks."""

    name = "yolo11-seg"

    def load(self, args: SegmentorArgs, settings: Settings) -> YoloSegmentor:
        return cast(YoloSegmentor, build_segmentor("yolo", settings, **args.model_overrides()))

    def warmup_options(self) -> DetectOptions:
        return DetectOptions()

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        if self.args.cuda_graphs is not False:  # on unless turned off
            self.segmentor.capture_graphs(self.args.warmup_size, batch_sizes)

    def warmup_extra(self) -> None:
        """Initialise the device JPEG decoder: its first call costs seconds (4.9 s measured
        on an H100), which would otherwise land on the first requests."""
        if self.device.type != "cuda":
            return
        data = encoders.jpeg(self.warmup_frame(), quality=90)
        jpeg = probe_jpeg(data, max_pixels=self.args.max_pixels)
        if jpeg is not None:
            decode_jpegs_on(self.device, [jpeg])

    def run_model(self, items: list[Pending]) -> list[Any]:
        """Detections per item; JPEGs sent undecoded are decoded here, on the model's device,
        and one that fails to decode gets its own error without failing the batch."""
        frames: list[Any] = [item.frame for item in items]
        encoded = [i for i, frame in enumerate(frames) if isinstance(frame, EncodedJPEG)]
        if encoded:
            clock = StageClock(self.device, self.step_timings)
            decoded = decode_jpegs_on(self.device, [frames[i] for i in encoded])
            clock.lap("jpeg_decode")
            for index, frame in zip(encoded, decoded, strict=True):
                frames[index] = frame
        results: list[Any] = [f if isinstance(f, Exception) else None for f in frames]
        good = [i for i, f in enumerate(frames) if not isinstance(f, Exception)]
        detections = self.segmentor.predict(
            [frames[i] for i in good], [items[i].options for i in good], self.step_timings
        )
        for index, d in zip(good, detections, strict=True):
            results[index] = {
                "width": d.width,
                "height": d.height,
                "model": self.segmentor.source,
                "instances": [inst.as_dict() for inst in d.instances],
            }
        return results

    async def segment(
        self,
        image: bytes | np.ndarray | EncodedJPEG,
        options: DetectOptions | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Instances of one image: boxes, scores, classes and RLE masks at its own size."""
        frame = await self.decode(image)
        result: dict[str, Any] = await self.submit(frame, options or DetectOptions(), deadline)
        return result

    async def segment_each(
        self,
        images: list[np.ndarray | EncodedJPEG],
        options: DetectOptions | None = None,
        deadline: float | None = None,
    ) -> list[dict[str, Any] | BaseException]:
        """Instances of many frames; a frame that fails gets its error in its place."""
        return await self.submit_each(images, options or DetectOptions(), deadline)
