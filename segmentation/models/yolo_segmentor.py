"""Ultralytics YOLO11-seg instance segmentation: uint8 RGB frames in, instances with RLE masks out.

The Ultralytics predictor is bypassed on purpose: it re-converts a module to FP32 on CPU
devices, letterboxes on the CPU one frame at a time, and its ``retina_masks`` path allocates
``instances x H x W`` float32 at full frame size. Here letterboxing runs batched on the device,
and masks are upsampled a bounded chunk of instances at a time.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segmentation.batching import pad_to_bucket
from segmentation.config import DEFAULT_YOLO_MODEL
from segmentation.encoders import encode_rle
from segmentation.errors import ModelLoadError
from segmentation.models.base import ModelInfo, StageClock, host_batch
from segmentation.options import DetectOptions
from segmentation.precision import Precision, apply_precision, choose_precision, resolve_device
from segmentation.rle import encode_rle_batch
from segmentation_standins import describe as describe_standin

logger = logging.getLogger(__name__)

FP16_MESSAGE = "YOLO model converted to FP16 precision for memory efficiency"
PAD_VALUE = 114 / 255.0
#: Upper bound on float elements materialised at once when upsampling masks to frame size:
#: 32 Mi elements = 128 MiB of float32, whatever the frame size or instance count.
MASK_ELEMENT_BUDGET = 32 * 1024 * 1024
#: The same bound for frames being letterboxed: 64 Mi elements, ten 1080p frames at a time.
PREPROCESS_ELEMENT_BUDGET = 64 * 1024 * 1024

#: A uint8 ``HxWx3`` RGB array, or a uint8 ``3xHxW`` tensor already decoded on a device.
Frame = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Detection:
    """One object the model found: box in original pixels (xyxy), score, class, COCO RLE mask.

    ``as_dict()`` is its wire form, an ``Instance`` of the API (``segmentation_service.schemas``)
    that the client parses back into ``segmentation_client.Instance``.
    """

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str
    mask: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "box": [round(v, 2) for v in self.box],
            "score": round(self.score, 5),
            "class_id": self.class_id,
            "class_name": self.class_name,
            "mask": self.mask,
        }


@dataclass(frozen=True)
class Detections:
    """All instances found in one frame of ``width`` x ``height`` pixels."""

    width: int
    height: int
    instances: list[Detection] = field(default_factory=list)


@dataclass(frozen=True)
class _Letterbox:
    scale: float
    pad_left: float
    pad_top: float
    height: int
    width: int
    input_height: int


class YoloSegmentor:
    """YOLO11-seg from a ``.pt`` checkpoint, a model name, a ``.yaml`` file, or a stand-in."""

    name = "yolo11-seg"

    def __init__(
        self,
        model_path: str = DEFAULT_YOLO_MODEL,
        device: str | torch.device = "auto",
        use_fp16: bool = True,
        *,
        imgsz: int = 640,
    ) -> None:
        import segmentation_standins as standins

        self.device = resolve_device(device)
        self.source = model_path
        self.imgsz = imgsz
        self.stand_in = standins.is_standin(model_path)
        path = str(standins.materialize(model_path)) if self.stand_in else model_path
        model = _load_ultralytics(path)
        names: Any = model.names
        self.names: dict[int, str] = {int(k): str(v) for k, v in names.items()}
        stride: Any = getattr(model, "stride", torch.tensor([32]))
        self.stride = int(max(stride))
        self.precision: Precision = apply_precision(
            model, choose_precision(self.device, use_fp16), success_message=FP16_MESSAGE
        )
        self.model = model.to(self.device)
        #: Batch sizes the model runs at (see :func:`segmentation.batching.batch_buckets`);
        #: None runs every batch at its own size.
        self.batch_buckets: tuple[int, ...] | None = None
        self._graphs: Any = None  # GraphedForward, once capture_graphs succeeded
        #: Why the last capture failed (None: it did not, or none was tried).
        self.graph_error: str | None = None

    @property
    def graph_batch_sizes(self) -> list[int]:
        """Batch sizes replayed from CUDA graphs (empty: every batch runs eagerly)."""
        return self._graphs.batch_sizes if self._graphs is not None else []

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            source=self.source,
            revision=None,
            precision=self.precision.name,
            precision_reason=self.precision.reason,
            device=str(self.device),
            stand_in=self.stand_in,
            stand_in_weights=describe_standin(self.source),
        )

    @torch.inference_mode()
    def predict(
        self,
        frames: Sequence[Frame],
        options: DetectOptions | Sequence[DetectOptions] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Detections]:
        """Instances per frame; boxes and masks at each frame's original size.

        ``options`` is one set of thresholds for all frames, or one per frame (frames of
        different requests share a batch). ``timings``, when given, receives the seconds
        spent in each step (``preprocess``, ``forward``, ``postprocess``).
        """
        if not frames:
            return []
        if options is None or isinstance(options, DetectOptions):
            options = [options or DetectOptions()] * len(frames)
        if len(options) != len(frames):
            raise ValueError(f"{len(options)} options for {len(frames)} frames")
        clock = StageClock(self.device, timings)
        batch, boxes = self.preprocess(frames)
        clock.lap("preprocess")
        preds, protos = self.forward(batch)
        clock.lap("forward")
        results = self.postprocess(preds, protos, boxes, options)
        clock.lap("postprocess")
        return results

    def preprocess(self, frames: Sequence[Frame]) -> tuple[torch.Tensor, list[_Letterbox]]:
        """Letterbox on the device. Same-size frames get the smallest stride-aligned rectangle.

        A frame is a uint8 ``HxWx3`` RGB array, or a uint8 ``3xHxW`` tensor already decoded
        on a device (nvJPEG), which then never passes through host memory.
        """
        sizes = [_frame_size(frame) for frame in frames]
        if all(size == sizes[0] for size in sizes):
            out_h, out_w = self._rect_shape(*sizes[0])
        else:
            out_h = out_w = self.imgsz
        batch = torch.full((len(frames), 3, out_h, out_w), PAD_VALUE, device=self.device)
        boxes: list[_Letterbox] = []
        # Runs of same-size frames are uploaded, resized and placed a few at a time: a batch of
        # 64 video frames costs a handful of kernel launches, not a few hundred, while the
        # float copies stay within PREPROCESS_ELEMENT_BUDGET.
        start = 0
        for stop in range(1, len(frames) + 1):
            if (
                stop < len(frames)
                and sizes[stop] == sizes[start]
                and stop - start < _chunk(sizes[start])
            ):
                continue
            height, width = sizes[start]
            scale = min(out_h / height, out_w / width)
            new_h, new_w = max(round(height * scale), 1), max(round(width * scale), 1)
            top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
            images = self._upload(frames[start:stop]).float().div_(255.0)
            if (new_h, new_w) != (height, width):
                images = F.interpolate(
                    images, size=(new_h, new_w), mode="bilinear", align_corners=False
                )
            batch[start:stop, :, top : top + new_h, left : left + new_w] = images
            boxes.extend([_Letterbox(scale, left, top, height, width, out_h)] * (stop - start))
            start = stop
        return batch.to(self.dtype), boxes

    def _upload(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Same-size frames as one uint8 ``[N, 3, H, W]`` tensor on the device."""
        tensors = [f for f in frames if isinstance(f, torch.Tensor)]
        if len(tensors) == len(frames):
            return torch.stack([t.to(self.device, non_blocking=True) for t in tensors])
        arrays = [
            f.permute(1, 2, 0).cpu().numpy() if isinstance(f, torch.Tensor) else f for f in frames
        ]
        host = host_batch(arrays, pin=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def _rect_shape(self, height: int, width: int) -> tuple[int, int]:
        scale = min(self.imgsz / height, self.imgsz / width)
        new_h, new_w = max(round(height * scale), 1), max(round(width * scale), 1)
        return (
            math.ceil(new_h / self.stride) * self.stride,
            math.ceil(new_w / self.stride) * self.stride,
        )

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw predictions ``[B, 4 + nc + 32, anchors]`` and mask prototypes ``[B, 32, h, w]``.

        Padded to the next of ``batch_buckets``; replayed from a CUDA graph where one was
        captured for the shape (:meth:`capture_graphs`).
        """
        size = batch.shape[0]
        padded = pad_to_bucket(batch, self.batch_buckets)
        if self._graphs is not None:
            preds, protos = self._graphs(padded)
        else:
            preds, protos = _split_heads(self.model(padded))
        return preds[:size], protos[:size]

    def capture_graphs(self, frame_size: tuple[int, int], batch_sizes: Sequence[int]) -> bool:
        """Capture CUDA graphs of the model for frames of ``frame_size`` (height, width) at
        each batch size. False (and eager runs, as before) where that is not possible."""
        if self.device.type != "cuda":
            return False
        from segmentation.graphs import try_capture

        out_h, out_w = self._rect_shape(*frame_size)
        layers: Any = getattr(self.model, "model", None)
        head = layers[-1] if layers is not None else None

        def anchors() -> object:  # the Detect head caches anchors per input shape
            return (getattr(head, "anchors", None), getattr(head, "strides", None))

        def same_anchors(example: torch.Tensor) -> None:
            """The head recomputes its anchors whenever the feature shape changes, batch
            size included, and Ultralytics 8.4 builds them with a host-to-device copy that a
            capture cannot hold. Anchors depend on height and width alone, which every
            example shares: the warm-up's stay valid, so mark them as made for this batch."""
            shape = getattr(head, "shape", None)
            if head is not None and shape is not None and len(shape) == 4:
                head.shape = torch.Size((example.shape[0], *shape[1:]))

        examples = [
            torch.zeros((n, 3, out_h, out_w), dtype=self.dtype, device=self.device)
            for n in batch_sizes
        ]
        try:
            graphs, error = try_capture(
                self.source, self.model, _split_heads, examples, anchors, same_anchors
            )
        finally:
            if head is not None and hasattr(head, "shape"):
                head.shape = None  # eager calls recompute anchors into memory of their own
        if graphs is None:
            self.graph_error = error
            return False
        self._graphs = graphs
        return True

    def postprocess(
        self,
        preds: torch.Tensor,
        protos: torch.Tensor,
        boxes: list[_Letterbox],
        options: Sequence[DetectOptions],
    ) -> list[Detections]:
        from ultralytics.utils.nms import non_max_suppression

        preds = preds.float()
        # One NMS call per distinct set of thresholds (usually one for the whole batch).
        groups: dict[DetectOptions, list[int]] = {}
        for index, opts in enumerate(options):
            groups.setdefault(opts, []).append(index)
        kept: list[torch.Tensor | None] = [None] * len(options)
        for opts, indices in groups.items():
            selected = preds if len(indices) == len(options) else preds[indices]
            found = non_max_suppression(
                selected,
                opts.conf,
                opts.iou,
                classes=list(opts.classes) if opts.classes is not None else None,
                max_det=opts.max_det,
                nc=len(self.names),
                # The default limit (0.05 s per image) silently drops detections when the
                # process is busy; a served batch must not lose objects to a timer.
                max_time_img=10.0,
            )
            for index, det in zip(indices, found, strict=True):
                kept[index] = det
        return [
            self._frame_result(det, proto.float(), box)
            for det, proto, box in zip(kept, protos, boxes, strict=True)
            if det is not None
        ]

    def _frame_result(self, det: torch.Tensor, proto: torch.Tensor, lb: _Letterbox) -> Detections:
        if det.shape[0] == 0:
            return Detections(lb.width, lb.height, [])
        xyxy = det[:, :4].clone()
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - lb.pad_left) / lb.scale).clamp_(0, lb.width)
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - lb.pad_top) / lb.scale).clamp_(0, lb.height)
        masks = self._masks(det[:, 6:], proto, xyxy, lb)
        boxes_l = xyxy.cpu().tolist()
        scores = det[:, 4].cpu().tolist()
        classes = det[:, 5].int().cpu().tolist()
        instances = [
            Detection(
                box=(b[0], b[1], b[2], b[3]),
                score=s,
                class_id=c,
                class_name=self.names.get(c, str(c)),
                mask=m,
            )
            for b, s, c, m in zip(boxes_l, scores, classes, masks, strict=True)
        ]
        return Detections(lb.width, lb.height, instances)

    def _masks(
        self, coeffs: torch.Tensor, proto: torch.Tensor, xyxy: torch.Tensor, lb: _Letterbox
    ) -> list[dict[str, Any]]:
        """COCO RLE masks at frame size, upsampling a bounded chunk of instances at a time."""
        channels, proto_h, proto_w = proto.shape
        # The letterboxed content region, in prototype pixels.
        ratio = proto_h / lb.input_height
        top = int(lb.pad_top * ratio)
        left = int(lb.pad_left * ratio)
        bottom = min(proto_h, math.ceil((lb.pad_top + lb.height * lb.scale) * ratio))
        right = min(proto_w, math.ceil((lb.pad_left + lb.width * lb.scale) * ratio))
        logits = (coeffs.float() @ proto.view(channels, -1)).view(-1, proto_h, proto_w)
        logits = logits[:, top:bottom, left:right]
        chunk = max(1, MASK_ELEMENT_BUDGET // (lb.height * lb.width))
        rows = torch.arange(lb.height, device=proto.device).view(1, -1, 1)
        cols = torch.arange(lb.width, device=proto.device).view(1, 1, -1)
        encoded: list[dict[str, Any]] = []
        for start in range(0, logits.shape[0], chunk):
            part = F.interpolate(
                logits[None, start : start + chunk],
                size=(lb.height, lb.width),
                mode="bilinear",
                align_corners=False,
            )[0]
            box = xyxy[start : start + chunk, :, None, None]
            inside = (
                (cols >= box[:, 0]) & (cols < box[:, 2]) & (rows >= box[:, 1]) & (rows < box[:, 3])
            )
            binary = (part > 0) & inside
            if binary.device.type == "cuda":
                # run boundaries found on the GPU; only their positions come to the host
                encoded.extend(encode_rle_batch(binary))
            else:  # pycocotools on the host is faster than torch's CPU kernels here
                encoded.extend(encode_rle(mask) for mask in binary.to(torch.uint8).numpy())
        return encoded


def _split_heads(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, mask prototypes) out of an Ultralytics segmentation model's output."""
    head = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(head, (tuple, list)) and len(head) >= 2:
        return head[0], head[1]
    raise RuntimeError("not a segmentation model (no mask prototypes)")


def _chunk(size: tuple[int, int]) -> int:
    """Frames of this size whose float copies fit PREPROCESS_ELEMENT_BUDGET."""
    return max(1, PREPROCESS_ELEMENT_BUDGET // (3 * size[0] * size[1]))


def _frame_size(frame: Frame) -> tuple[int, int]:
    """(height, width) of an ``HxWx3`` uint8 array or a ``3xHxW`` uint8 tensor."""
    if isinstance(frame, torch.Tensor):
        if frame.ndim != 3 or frame.shape[0] != 3 or frame.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 3xHxW tensor, got {frame.dtype} {tuple(frame.shape)}"
            )
        return int(frame.shape[1]), int(frame.shape[2])
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 RGB frame, got {frame.dtype} {frame.shape}")
    return int(frame.shape[0]), int(frame.shape[1])


def _load_ultralytics(path: str) -> torch.nn.Module:
    """The ``nn.Module`` of an Ultralytics checkpoint, name or yaml, fused and in eval mode."""
    from ultralytics import YOLO

    # Ultralytics would try to download a missing file named like one of its releases, even
    # at an explicit path, and fail offline with a download error that hides the cause.
    if os.sep in path and path.endswith(".pt") and not os.path.isfile(path):
        raise ModelLoadError(
            f"YOLO_MODEL={path!r}: no such file. Put the .pt file there (Ultralytics publishes "
            "them at https://github.com/ultralytics/assets/releases), or set YOLO_MODEL to "
            "another .pt path, or use a .yaml architecture for random weights"
        )
    try:
        yolo = YOLO(path)
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"YOLO_MODEL={path!r}: weights not found ({exc}). Put the .pt file on disk and set "
            "YOLO_MODEL to its path, or use a .yaml architecture for random weights"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"YOLO_MODEL={path!r}: cannot load: {exc}") from exc
    model = yolo.model
    if not isinstance(model, torch.nn.Module) or getattr(yolo, "task", None) != "segment":
        raise ModelLoadError(
            f"YOLO_MODEL={path!r} is not a segmentation model (task must be segment)"
        )
    model = model.fuse() if hasattr(model, "fuse") else model
    return model.eval().requires_grad_(False)
