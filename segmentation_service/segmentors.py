"""The two segmentor deployments. Resources, replicas and ``user_config`` come from config.

Each loads its model and says how to run one batch; queueing, batching, OOM and failure
isolation, warm-up and reconfigure are :class:`SegmentorReplica`'s.

What crosses the process boundary is close to what the client sends and gets: the router
hands over the encoded image (:class:`EncodedImage`, its header checked), the replica decodes
it next to the model (nvJPEG on the device for plain JPEGs, its own codec threads for the
rest), composes the cutout on the device where the pixels are, and answers the PNG bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from ray import serve

from segmentation.compose import Composed
from segmentation.config import Settings
from segmentation.encoders import encode_pixels
from segmentation.errors import InvalidRequestError
from segmentation.factory import build_segmentor
from segmentation.imaging import EncodedImage, EncodedOutput
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.options import CutoutOptions, DetectOptions, Output
from segmentation_service.concurrency import all_or_cancel
from segmentation_service.config import SegmentorArgs
from segmentation_service.replica import Pending, SegmentorReplica

#: ``(left, top, right, bottom)`` in pixels of the image.
Box = tuple[int, int, int, int]


def raw_matte(alpha: np.ndarray) -> bytes:
    """The matte's bytes, row by row, one byte per pixel."""
    return np.ascontiguousarray(alpha, dtype=np.uint8).tobytes()


def cutout_options(output: Output | CutoutOptions) -> CutoutOptions:
    """What one frame of ``RMBGDeployment`` answers: an output name (``rgba``, ``mask``,
    ``raw``: the plain cutout or matte) or full :class:`CutoutOptions` (422 if invalid)."""
    return output if isinstance(output, CutoutOptions) else CutoutOptions(output)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class RMBGDeployment(SegmentorReplica):
    """RMBG-2.0 background removal: encoded images in, PNG cutouts or mattes out."""

    name = "rmbg-2.0"

    def load(self, args: SegmentorArgs, settings: Settings) -> RMBG20Segmentor:
        return cast(RMBG20Segmentor, build_segmentor("rmbg", settings, **args.model_overrides()))

    def warmup_options(self) -> CutoutOptions:
        # The composition on the device is part of the peak, edge-colour refinement included.
        return CutoutOptions("rgba", refine=True)

    def run_model(self, items: list[Pending]) -> list[Any]:
        """Raw mattes, or outputs composed on the device (cutouts, mattes, cropped, scaled,
        refined, on a background), of one batch, still on their way to the host (``Arriving``:
        the copy runs while the next batch computes); a frame that failed to decode keeps its
        error in its place."""
        frames = self.device_frames(items)
        good = [i for i, frame in enumerate(frames) if not isinstance(frame, Exception)]
        outputs = self.segmentor.predict_outputs_later(
            [frames[i] for i in good],
            [items[i].options for i in good],
            self.step_timings,
        ).each()
        for index, output in zip(good, outputs, strict=True):
            frames[index] = output
        return frames

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        if self.args.cuda_graphs:  # off unless asked for: see SegmentorArgs.cuda_graphs
            self.segmentor.capture_graphs(batch_sizes)

    async def remove_background(
        self,
        image: EncodedImage | np.ndarray,
        output: Output | CutoutOptions = "rgba",
        deadline: float | None = None,
    ) -> EncodedOutput:
        """One image's RGBA cutout PNG (``rgba``), grayscale matte PNG (``mask``) or raw
        matte bytes (``raw``), at the image's own size (which the answer carries); or what
        full :class:`CutoutOptions` ask for (cropped, scaled, refined, on a background, in
        PNG, WebP or JPEG), with the size it has and the subject's box."""
        options = cutout_options(output)
        async with self.prepared(image) as frame:
            return await self._answer_one(frame, options, deadline)

    async def remove_background_each(
        self,
        images: list[EncodedImage | np.ndarray],
        output: Output | CutoutOptions = "rgba",
        deadline: float | None = None,
    ) -> list[EncodedOutput | BaseException]:
        """The same for many images; a frame that fails gets its error in its place."""
        options = cutout_options(output)

        async def one(image: EncodedImage | np.ndarray) -> EncodedOutput:
            async with self.prepared(image) as frame:
                return await self._answer_one(frame, options, deadline)

        return list(await asyncio.gather(*(one(image) for image in images), return_exceptions=True))

    async def cutouts(
        self,
        image: EncodedImage | np.ndarray,
        boxes: Sequence[Box],
        deadline: float | None = None,
        options: CutoutOptions | None = None,
    ) -> list[EncodedOutput]:
        """RGBA cutout PNGs of the parts of one image inside ``boxes`` (``/v1/products``), or
        what ``options`` ask for of each. The image is decoded once; each box is a frame of
        its own in the batches, a view of the decoded image, not a copy. All or nothing: the
        first box that fails cancels the others (their frames leave the queue) and its error
        is raised."""
        options = options or CutoutOptions()
        if not boxes:
            return []
        async with self.prepared(image) as frame:
            height, width = _size(frame)
            for box in boxes:
                _check_box(box, width, height)
            return await all_or_cancel(
                self._answer_one(frame, options, deadline, _box(box)) for box in boxes
            )

    async def _answer_one(
        self, frame: Any, options: CutoutOptions, deadline: float | None, crop: Box | None = None
    ) -> EncodedOutput:
        result = await self.submit(frame, options, deadline, crop)
        if not isinstance(result, Composed):  # output=raw: the matte's bytes
            height, width = result.shape[:2]
            return EncodedOutput(
                await self.encode(raw_matte, result), width, height, options.media_type
            )
        height, width = result.pixels.shape[:2]
        data = await self.encode(encode_pixels, result.pixels, options)
        return EncodedOutput(
            data, width, height, options.media_type, result.subject, result.foreground
        )


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10)
class YoloDeployment(SegmentorReplica):
    """YOLO11-seg instance segmentation; answers JSON-ready dicts with COCO RLE masks."""

    name = "yolo11-seg"
    segmentor: YoloSegmentor

    def load(self, args: SegmentorArgs, settings: Settings) -> YoloSegmentor:
        return cast(YoloSegmentor, build_segmentor("yolo", settings, **args.model_overrides()))

    def warmup_options(self) -> DetectOptions:
        return DetectOptions()

    def prepare_graphs(self, batch_sizes: tuple[int, ...]) -> None:
        if self.args.cuda_graphs is not False:  # on unless turned off
            self.segmentor.capture_graphs(self.args.warmup_size, batch_sizes)

    def run_model(self, items: list[Pending]) -> list[Any]:
        """Detections per item; a frame that failed to decode on the device gets its own
        error without failing the batch."""
        frames = self.device_frames(items)
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
        image: EncodedImage | np.ndarray,
        options: DetectOptions | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Instances of one image: boxes, scores, classes and RLE masks at its own size."""
        options = self._checked(options)
        async with self.prepared(image) as frame:
            result: dict[str, Any] = await self.submit(frame, options, deadline)
            return result

    async def segment_each(
        self,
        images: list[EncodedImage | np.ndarray],
        options: DetectOptions | None = None,
        deadline: float | None = None,
    ) -> list[dict[str, Any] | BaseException]:
        """Instances of many frames; a frame that fails gets its error in its place. Options
        the model cannot take (a class it does not have) fail the whole call."""
        return await self.submit_each(images, self._checked(options), deadline)

    def _checked(self, options: DetectOptions | None) -> DetectOptions:
        """``options``, once their class ids are this model's (422 otherwise: an id past the
        model's classes made Ultralytics' NMS overflow, and its batch be split frame by
        frame)."""
        options = options or DetectOptions()
        names = self.segmentor.names
        unknown = sorted(set(options.classes or ()) - set(names))
        if unknown:
            shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
            raise InvalidRequestError(
                f"classes: {shown} not among this model's {len(names)} classes "
                f"(ids {min(names, default=0)}-{max(names, default=0)})"
            )
        return options


def _size(frame: Any) -> tuple[int, int]:
    """(height, width) of a decoded array or an encoded image."""
    if isinstance(frame, EncodedImage):
        return frame.height, frame.width
    return int(frame.shape[0]), int(frame.shape[1])


def _box(box: Sequence[int]) -> Box:
    left, top, right, bottom = (int(v) for v in box)
    return left, top, right, bottom


def _check_box(box: Sequence[int], width: int, height: int) -> None:
    left, top, right, bottom = box
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise InvalidRequestError(f"crop box {list(box)} is not inside the {width}x{height} image")
