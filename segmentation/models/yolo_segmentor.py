"""Ultralytics YOLO11-seg instance segmentation: uint8 RGB frames in, instances with RLE masks out.

The Ultralytics predictor is bypassed on purpose: it re-converts a module to FP32 on CPU
devices, letterboxes on the CPU one frame at a time, and its ``retina_masks`` path allocates
``instances x H x W`` float32 at full frame size. Here letterboxing runs batched on the device,
and each instance's mask is sampled inside its box only, bit for bit the mask that upsampling
to the whole frame gives (*Instance masks, box by box*, below): three products of a 1080p
frame take 5.5-9.5 ms on a 2-core CPU instead of 25-28.5 ms. On a GPU, instances that one
full-frame chunk holds (16 at 1080p) keep the full-frame path, cheaper there. A batch's NMS is
one call (``yolo_nms.py``) and its frames' masks one pass: at batch 64 of 1080p product shots on
an H100, 27.8 ms of postprocess instead of 109.2 frame by frame (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segmentation.batching import bounded_runs, pad_to_bucket
from segmentation.config import DEFAULT_YOLO_MODEL
from segmentation.encoders import encode_rle
from segmentation.errors import ModelLoadError
from segmentation.models.base import Frame, ModelInfo, StageClock, frame_size, host_batch
from segmentation.models.yolo_nms import batched_nms
from segmentation.options import DetectOptions
from segmentation.precision import Precision, apply_precision, choose_precision, resolve_device
from segmentation.rle import encode_boxed_rle, encode_rle_batch
from segmentation_standins import describe as describe_standin

logger = logging.getLogger(__name__)

FP16_MESSAGE = "YOLO model converted to FP16 precision for memory efficiency"
PAD_VALUE = 114 / 255.0
#: Upper bound on the mask pixels computed at once: frame pixels of the instances upsampled
#: together to the whole frame, or box pixels (padded to a chunk's largest box) of the boxes
#: sampled together: 32 Mi = 128 MiB of float32 values (a box chunk's temporaries peak at
#: about four times that), whatever the frame size or instance count.
MASK_ELEMENT_BUDGET = 32 * 1024 * 1024
#: The same bound for frames being letterboxed: 64 Mi elements, ten 1080p frames at a time.
PREPROCESS_ELEMENT_BUDGET = 64 * 1024 * 1024


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
        sizes = [frame_size(frame) for frame in frames]
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
        """Instances of every frame of a batch: one NMS call for the batch
        (:func:`~segmentation.models.yolo_nms.batched_nms`), then the boxes, masks and RLE of
        all frames that share a letterbox together, with one copy to the host. The same
        instances and strings as :meth:`postprocess_frame_by_frame`, which waited for the GPU
        a dozen times per frame (at batch 64 on an H100, 107 ms against a 3.4 ms forward)."""
        kept = self._kept_rows(preds, options, whole_batch=True)
        by_letterbox: dict[_Letterbox, list[int]] = {}
        for index, box in enumerate(boxes):
            by_letterbox.setdefault(box, []).append(index)
        protos = protos.float()
        per_instance = protos.shape[-2] * protos.shape[-1]
        results: dict[int, Detections] = {}
        for box, indices in by_letterbox.items():
            # Runs of frames whose mask logits fit MASK_ELEMENT_BUDGET: a crowded batch of 64
            # frames, 300 instances each at 640, would otherwise hold 2 GiB of them at once.
            sizes = [kept[i].shape[0] * per_instance for i in indices]
            for run in bounded_runs(sizes, MASK_ELEMENT_BUDGET):
                frames = indices[run]
                answers = self._letterbox_results([kept[i] for i in frames], protos, frames, box)
                results.update(zip(frames, answers, strict=True))
        return [results[index] for index in range(len(boxes))]

    def postprocess_frame_by_frame(
        self,
        preds: torch.Tensor,
        protos: torch.Tensor,
        boxes: list[_Letterbox],
        options: Sequence[DetectOptions],
    ) -> list[Detections]:
        """The reference :meth:`postprocess` reproduces: Ultralytics' NMS, then each frame on
        its own."""
        kept = self._kept_rows(preds, options, whole_batch=False)
        return [
            self._letterbox_results([kept[index]], proto.float()[None], [0], box)[0]
            for index, (proto, box) in enumerate(zip(protos, boxes, strict=True))
        ]

    def _kept_rows(
        self, preds: torch.Tensor, options: Sequence[DetectOptions], whole_batch: bool
    ) -> dict[int, torch.Tensor]:
        """Each frame's NMS rows, by frame index, one NMS per distinct set of thresholds
        (usually one for the batch): :func:`batched_nms` for the frames together, or
        Ultralytics' image by image (``whole_batch`` False, or where ``batched_nms`` leaves an
        image to it)."""
        preds = preds.float()
        kept: dict[int, torch.Tensor] = {}
        for opts, indices in _option_groups(options).items():
            selected = preds if len(indices) == len(options) else preds[indices]
            found = None
            if whole_batch:
                found = batched_nms(
                    selected, opts.conf, opts.iou, opts.classes, opts.max_det, len(self.names)
                )
            if found is None:
                found = self._ultralytics_nms(selected, opts)
            kept.update(zip(indices, found, strict=True))
        return kept

    def _ultralytics_nms(self, preds: torch.Tensor, opts: DetectOptions) -> list[torch.Tensor]:
        from ultralytics.utils.nms import non_max_suppression

        found: list[torch.Tensor] = non_max_suppression(
            preds,
            opts.conf,
            opts.iou,
            classes=list(opts.classes) if opts.classes is not None else None,
            max_det=opts.max_det,
            nc=len(self.names),
            # The default limit (0.05 s per image) silently drops detections when the
            # process is busy; a served batch must not lose objects to a timer.
            max_time_img=10.0,
        )
        return found

    def _letterbox_results(
        self,
        dets: list[torch.Tensor],
        protos: torch.Tensor,
        frames: list[int],
        lb: _Letterbox,
    ) -> list[Detections]:
        """Instances of frames that share the letterbox ``lb``, their masks in one pass:
        ``dets[i]`` are frame ``frames[i]``'s NMS rows and ``protos[frames[i]]`` its mask
        prototypes (float32)."""
        counts = [det.shape[0] for det in dets]
        if not sum(counts):
            return [Detections(lb.width, lb.height, []) for _ in dets]
        det = torch.cat(dets)
        xyxy = det[:, :4].clone()
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - lb.pad_left) / lb.scale).clamp_(0, lb.width)
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - lb.pad_top) / lb.scale).clamp_(0, lb.height)
        # One product a frame (each instance with its own frame's prototypes), as in
        # _mask_logits; the slicing, casts and crop once for the run, not per frame: each op
        # costs a replica host time that its event loop waits for.
        prototypes = protos.flatten(2).unbind(0)  # [C, h*w] a frame, views
        coeffs = det[:, 6:].float().split(counts)
        products = [
            part @ prototypes[frame]
            for part, frame in zip(coeffs, frames, strict=True)
            if part.shape[0]
        ]
        logits = _content(torch.cat(products).view(-1, *protos.shape[-2:]), lb)
        if _masks_batch_exactly(logits, lb):
            masks = _box_masks(logits, xyxy, lb.height, lb.width)
        else:  # each frame's chunks as the reference forms them
            masks = [
                mask
                for part, part_boxes in zip(logits.split(counts), xyxy.split(counts), strict=True)
                for mask in _box_masks(part, part_boxes, lb.height, lb.width)
            ]
        host = torch.cat((xyxy, det[:, 4:6]), 1).cpu().tolist()
        instances = [
            Detection(
                box=(row[0], row[1], row[2], row[3]),
                score=row[4],
                class_id=int(row[5]),
                class_name=self.names.get(int(row[5]), str(int(row[5]))),
                mask=mask,
            )
            for row, mask in zip(host, masks, strict=True)
        ]
        results = []
        start = 0
        for count in counts:
            results.append(Detections(lb.width, lb.height, instances[start : start + count]))
            start += count
        return results

    def _masks(
        self, coeffs: torch.Tensor, proto: torch.Tensor, xyxy: torch.Tensor, lb: _Letterbox
    ) -> list[dict[str, Any]]:
        """COCO RLE masks of one frame at frame size, each sampled inside its box only
        (:func:`_box_masks`)."""
        return _box_masks(_mask_logits(coeffs, proto, lb), xyxy, lb.height, lb.width)


def _mask_logits(coeffs: torch.Tensor, proto: torch.Tensor, lb: _Letterbox) -> torch.Tensor:
    """One frame's instance mask logits over the letterboxed content region, in prototype
    pixels: ``[N, h, w]``."""
    channels, proto_h, proto_w = proto.shape
    logits = (coeffs.float() @ proto.view(channels, -1)).view(-1, proto_h, proto_w)
    return _content(logits, lb)


def _content(logits: torch.Tensor, lb: _Letterbox) -> torch.Tensor:
    """``[N, h, w]`` prototype-pixel logits cut to the letterboxed content region."""
    proto_h, proto_w = logits.shape[-2:]
    ratio = proto_h / lb.input_height
    top = int(lb.pad_top * ratio)
    left = int(lb.pad_left * ratio)
    bottom = min(proto_h, math.ceil((lb.pad_top + lb.height * lb.scale) * ratio))
    right = min(proto_w, math.ceil((lb.pad_left + lb.width * lb.scale) * ratio))
    return logits[:, top:bottom, left:right]


def _option_groups(options: Sequence[DetectOptions]) -> dict[DetectOptions, list[int]]:
    """Frame indices by their set of thresholds (usually one set for the whole batch)."""
    groups: dict[DetectOptions, list[int]] = {}
    for index, opts in enumerate(options):
        groups.setdefault(opts, []).append(index)
    return groups


def _masks_batch_exactly(logits: torch.Tensor, lb: _Letterbox) -> bool:
    """Whether the instances of several frames can take one :func:`_box_masks` call and get
    each frame's own strings. Not on a CPU on one thread, where which of two kernels the
    full-frame path used depends on an instance's place in its frame's chunks, nor on a CPU
    for small frames, which take the full-frame path: there the channels-last kernel's
    rounding depends on how many instances are upsampled together."""
    if logits.device.type != "cpu":
        return True
    return torch.get_num_threads() != 1 and lb.height + lb.width > _SMALL_OUTPUT


def _split_heads(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, mask prototypes) out of an Ultralytics segmentation model's output."""
    head = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(head, (tuple, list)) and len(head) >= 2:
        return head[0], head[1]
    raise RuntimeError("not a segmentation model (no mask prototypes)")


def _chunk(size: tuple[int, int]) -> int:
    """Frames of this size whose float copies fit PREPROCESS_ELEMENT_BUDGET."""
    return max(1, PREPROCESS_ELEMENT_BUDGET // (3 * size[0] * size[1]))


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


# Instance masks, box by box.
#
# An instance's mask is the sign of its prototype logits upsampled bilinearly to the frame,
# kept inside its box. Sampling the frame only inside each box gives the masks that upsampling
# the whole content region to the whole frame gave, bit for bit, if each box pixel is computed
# with PyTorch's arithmetic: its source indices and weights (``area_pixel_compute_source_index``
# in ATen's UpSample.h) and the rounding of its kernel's multiply-adds. That arithmetic is
# probed once per device and kernel (:func:`_recipe`); where no recipe reproduces it, or the
# frame is tiny, the full-frame path (:func:`_frame_masks`) runs instead.
#
# Measured (median ms per frame, box path against full frame; the trained stand-in on synthetic
# 1080p shots of 1-4 products, boxes 5-55% of the frame, and shelves of 150x120 boxes): this
# project's 2-core CPU, 3 products 5.5-9.5 against 25-28.5 and 1 product 2.4 against 9.7, on one
# thread 100 shelf boxes 40 against 2800. An H100, where both are bound by host work and the
# full-frame path's pixels cost little: 1-4 products 1.4-2.6 against 0.8-1.6, 30 boxes 5.8
# against 6.1, 100 boxes 14.7 against 20.0; there, frames that fit one full-frame chunk take
# the full-frame path (:func:`_full_frame_is_cheaper`).

#: PyTorch's generic CPU kernel and its CUDA kernel:
#: ``h0 (w0 v00 + w1 v01) + h1 (w0 v10 + w1 v11)``.
_SEPARABLE = "separable"
#: PyTorch's channels-last CPU kernel: ``v00 h0w0 + v01 h0w1 + v10 h1w0 + v11 h1w1``.
_FOUR_WEIGHTS = "four-weights"
#: PyTorch's CPU code takes its channels-last kernel for outputs of at most this many rows +
#: columns (``_use_vectorized_kernel_cond_2d``), with vector lanes for 8 channels and more.
#: Such frames are too small to gain from boxes: they take the full-frame path.
_SMALL_OUTPUT = 128


@dataclass(frozen=True)
class _Recipe:
    """How one of PyTorch's bilinear kernels rounds on one device.

    ``fused``: the kernel's source index ``scale * (dst + 0.5) - 0.5`` and each ``a * b + c`` of
    its interpolation are rounded once (fused multiply-adds: nvcc's, and GCC's on CPUs with
    FMA), not after the product and again after the sum. ``addcmul``: ``torch.addcmul`` rounds
    once too on this device, so a fused multiply-add is one op rather than four in float64.
    """

    kernel: str
    fused: bool
    addcmul: bool = False

    def multiply_add(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``a * b + c`` in float32 (``a`` and ``c`` of the result's shape), rounded like the
        kernel."""
        if not self.fused:
            return a * b + c
        if self.addcmul:
            return torch.addcmul(c, a, b)
        # The product of two floats is exact in float64, so the float64 sum rounded to float32
        # is the fused result (short of a tie between two roundings, some 2^-29 of cases, and
        # never of another sign).
        out = a.double()
        out.mul_(b)
        out.add_(c)
        return out.float()


@dataclass(frozen=True)
class _Axis:
    """Where each output pixel along one axis samples the source: PyTorch's two source indices
    and their weights, computed as its kernels compute them (read-only arrays)."""

    first: np.ndarray  # int64 source index (floor of the source coordinate)
    second: np.ndarray  # int64 the next source index, or the same one at the last
    weight_first: np.ndarray  # float32
    weight_second: np.ndarray  # float32

    @property
    def size(self) -> int:
        return len(self.first)


@functools.lru_cache(maxsize=64)
def _axis(in_size: int, out_size: int, fused: bool) -> _Axis:
    """``in_size`` source pixels resampled to ``out_size`` (cached: a stream's frames share a
    size)."""
    if in_size == out_size:  # PyTorch copies this axis
        first = second = np.arange(out_size, dtype=np.int64)
        weight = np.zeros(out_size, np.float32)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        centre = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
        if fused:  # exact in float64 (a 24-bit by 12-bit product), then rounded once
            source = (centre.astype(np.float64) * float(scale) - 0.5).astype(np.float32)
        else:
            source = centre * scale - np.float32(0.5)
        source = np.maximum(source, np.float32(0))
        first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
        weight = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
        second = np.where(first < in_size - 1, first + 1, first)
    axis = _Axis(first, second, np.float32(1) - weight, weight)
    for array in (axis.first, axis.second, axis.weight_first, axis.weight_second):
        array.flags.writeable = False
    return axis


_RECIPES: dict[tuple[str, str], _Recipe | None] = {}


def _box_masks(
    logits: torch.Tensor, xyxy: torch.Tensor, height: int, width: int
) -> list[dict[str, Any]]:
    """COCO RLE of each instance's mask at ``height`` x ``width``: the sign of its ``logits``
    (the letterboxed content region, ``[N, h, w]``) upsampled bilinearly to the frame, inside its
    box ``xyxy`` (frame pixels). Only box pixels are computed, a bounded chunk at a time; the
    same strings as :func:`_frame_masks`."""
    count = logits.shape[0]
    if count == 0:
        return []
    if height + width <= _SMALL_OUTPUT or _full_frame_is_cheaper(logits, height, width):
        return _frame_masks(logits, xyxy, height, width)
    recipes = [_recipe(logits.device, kernel) for kernel in _kernels(count, height, width, logits)]
    if any(recipe is None for recipe in recipes):
        return _frame_masks(logits, xyxy, height, width)
    boxes = _pixel_boxes(xyxy, height, width)
    logits = logits.contiguous()  # once: _sample_boxes takes its rows as a view
    # On the CPU every padded pixel costs time; on a GPU a chunk's launches cost more.
    thrifty = logits.device.type == "cpu"
    encoded: list[dict[str, Any]] = [{}] * count
    for recipe in dict.fromkeys(recipe for recipe in recipes if recipe is not None):
        rows = _axis(logits.shape[1], height, recipe.fused)
        cols = _axis(logits.shape[2], width, recipe.fused)
        mine = np.flatnonzero([r == recipe for r in recipes])
        for chunk in _box_chunks(boxes[mine], MASK_ELEMENT_BUDGET, thrifty):
            index = mine[chunk]
            values = _sample_boxes(logits, index, boxes[index], rows, cols, recipe)
            strings = encode_boxed_rle(values > 0, boxes[index], height, width)
            for i, rle in zip(index.tolist(), strings, strict=True):
                encoded[i] = rle
    return encoded


def _frame_masks(
    logits: torch.Tensor, xyxy: torch.Tensor, height: int, width: int
) -> list[dict[str, Any]]:
    """The full-frame path: each chunk of instances upsampled to the whole frame by
    ``F.interpolate``, cut to its box, then encoded. The reference the box path reproduces."""
    chunk = _frame_chunk(height, width)
    rows = torch.arange(height, device=logits.device).view(1, -1, 1)
    cols = torch.arange(width, device=logits.device).view(1, 1, -1)
    encoded: list[dict[str, Any]] = []
    for start in range(0, logits.shape[0], chunk):
        part = F.interpolate(
            logits[None, start : start + chunk],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0]
        box = xyxy[start : start + chunk, :, None, None]
        inside = (cols >= box[:, 0]) & (cols < box[:, 2]) & (rows >= box[:, 1]) & (rows < box[:, 3])
        binary = (part > 0) & inside
        if binary.device.type == "cuda":
            encoded.extend(encode_rle_batch(binary))
        else:  # pycocotools on the host is faster than torch's CPU kernels here
            encoded.extend(encode_rle(mask) for mask in binary.to(torch.uint8).numpy())
    return encoded


def _full_frame_is_cheaper(logits: torch.Tensor, height: int, width: int) -> bool:
    """On a GPU, instances that the full-frame path upsamples in one chunk take it: its dozen
    launches cost less than the box path's host work (indices, weights, one more sync), and
    its pixels cost little there. Measured on an H100 at 1080p, one frame per call (medians):
    1-4 products of the trained stand-in 0.8-1.6 ms at full frame against 1.4-2.6 ms in boxes,
    30 small boxes 6.1 against 5.8, 100 boxes 20.0 against 14.7. On a CPU boxes always win.
    """
    return logits.device.type != "cpu" and logits.shape[0] <= _frame_chunk(height, width)


def _frame_chunk(height: int, width: int) -> int:
    """Instances the full-frame path upsamples at once: MASK_ELEMENT_BUDGET frame pixels."""
    return max(1, MASK_ELEMENT_BUDGET // (height * width))


def _kernels(count: int, height: int, width: int, logits: torch.Tensor) -> list[str]:
    """The PyTorch kernel that the full-frame path upsampled each instance with.

    On the CPU, ``F.interpolate`` of exactly three channels on one thread takes the
    channels-last kernel (``upsample_bilinear2d_kernel_impl_float``), which rounds otherwise:
    a chunk of three instances did, on a replica whose torch runs one thread.
    """
    if logits.device.type != "cpu" or torch.get_num_threads() != 1:
        return [_SEPARABLE] * count
    chunk = _frame_chunk(height, width)
    kernels: list[str] = []
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        kernels.extend([_FOUR_WEIGHTS if size == 3 else _SEPARABLE] * size)
    return kernels


def _recipe(device: torch.device, kernel: str) -> _Recipe | None:
    """The rounding that reproduces ``kernel`` on ``device`` bit for bit, probed once against
    ``F.interpolate`` itself (None: no candidate does; the full-frame path runs).

    Fused multiply-adds were measured on x86 CPUs (PyTorch 2.11 and 2.14, AVX2 and AVX512
    builds) and on an H100; unfused is what a build without them computes.
    """
    key = (device.type, kernel)
    if key not in _RECIPES:
        source = torch.randn((3, 37, 53), generator=torch.Generator().manual_seed(0)) * 4
        source = source.to(device)
        if kernel == _FOUR_WEIGHTS:  # three channels and a small output reach that CPU kernel
            size = (61, 67)
        else:  # two channels reach the generic kernel on any thread count
            source, size = source[:2], (301, 467)
        expected = F.interpolate(source[None], size=size, mode="bilinear", align_corners=False)[0]
        whole = np.array([[0, size[0], 0, size[1]]] * len(source))
        candidates = [
            _Recipe(kernel, fused=True, addcmul=True),
            _Recipe(kernel, fused=True),
            _Recipe(kernel, fused=False),
        ]
        found = None
        for recipe in candidates:
            rows = _axis(source.shape[1], size[0], recipe.fused)
            cols = _axis(source.shape[2], size[1], recipe.fused)
            values = _sample_boxes(source, np.arange(len(source)), whole, rows, cols, recipe)
            if torch.equal(values, expected):
                found = recipe
                break
        if found is None:
            logger.warning(
                "YOLO masks: no box-sampling recipe reproduces F.interpolate's %s kernel on %s; "
                "masks are upsampled at full frame size",
                kernel,
                device.type,
            )
        _RECIPES[key] = found
    return _RECIPES[key]


def _pixel_boxes(xyxy: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``[N, 4]`` int64 rows ``top, bottom`` and columns ``left, right`` (half-open) of the
    pixels that the full-frame path's test ``c >= x1 & c < x2 & r >= y1 & r < y2`` keeps: for
    an integer ``c``, ``c >= x1`` is ``c >= ceil(x1)`` and ``c < x2`` is ``c < ceil(x2)``."""
    box = xyxy.float().cpu().numpy().astype(np.float64)
    finite = np.isfinite(box).all(axis=1, keepdims=True)  # NaN fails every comparison
    edges = np.ceil(np.where(finite, box, 0))
    left = np.clip(edges[:, 0], 0, width)
    right = np.clip(edges[:, 2], left, width)
    top = np.clip(edges[:, 1], 0, height)
    bottom = np.clip(edges[:, 3], top, height)
    return np.stack([top, bottom, left, right], axis=1).astype(np.int64)


def _box_chunks(boxes: np.ndarray, budget: int, thrifty: bool) -> list[np.ndarray]:
    """Instances grouped so that each group, padded to its tallest and widest box, has at most
    ``budget`` pixels (a box larger than that alone), largest boxes first. ``thrifty``: also
    at most twice its boxes' own pixels, so that boxes of like size share a group."""
    areas = np.maximum((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]), 1)
    chunks: list[list[int]] = []
    tallest = widest = used = 0
    for i in np.argsort(-areas, kind="stable").tolist():
        tall = max(tallest, int(boxes[i, 1] - boxes[i, 0]), 1)
        wide = max(widest, int(boxes[i, 3] - boxes[i, 2]), 1)
        padded = (len(chunks[-1]) + 1) * tall * wide if chunks else 0
        if chunks and padded <= budget and (not thrifty or padded <= 2 * (used + areas[i])):
            chunks[-1].append(i)
            tallest, widest, used = tall, wide, used + int(areas[i])
        else:
            chunks.append([i])
            tallest, widest, used = tall, wide, int(areas[i])
    return [np.array(chunk) for chunk in chunks]


def _sample_boxes(
    logits: torch.Tensor,
    index: np.ndarray,
    boxes: np.ndarray,
    rows: _Axis,
    cols: _Axis,
    recipe: _Recipe,
) -> torch.Tensor:
    """Upsampled logits of instances ``index`` at the pixels of their ``boxes`` (rows
    ``top, bottom``, columns ``left, right``): ``[n, tallest, widest]`` float32, each crop from
    its box's corner, padded with zeros to the largest box."""
    heights, widths = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    tall, wide = max(int(heights.max()), 1), max(int(widths.max()), 1)
    out_rows = _crop_pixels(boxes[:, 0], boxes[:, 1], tall, rows.size)
    out_cols = _crop_pixels(boxes[:, 2], boxes[:, 3], wide, cols.size)
    # Padding pixels get zero weights, so their values are 0: no mask pixel.
    row_kept = np.arange(tall) < heights[:, None]
    col_kept = np.arange(wide) < widths[:, None]
    weights = (
        rows.weight_first[out_rows] * row_kept,
        rows.weight_second[out_rows] * row_kept,
        cols.weight_first[out_cols] * col_kept,
        cols.weight_second[out_cols] * col_kept,
    )
    upper, lower = rows.first[out_rows], rows.second[out_rows]
    left, right = cols.first[out_cols], cols.second[out_cols]
    # Whole rows are picked by index_select (a copy of each row: fast on CPUs and GPUs alike),
    # columns by gather, each crop its own.
    source_h, source_w = logits.shape[1], logits.shape[2]
    source_rows = logits.reshape(-1, source_w)  # instance i's row r is row i * source_h + r
    first_row = index[:, None] * source_h
    device = logits.device
    if recipe.kernel == _SEPARABLE:
        # The kernel's inner sums (along a source row) depend on the source row and the output
        # column only: compute them once for the source rows each box reaches (a box of 400
        # rows of a 1080p frame reaches some 40), then blend two of them per output row.
        low, high = upper.min(axis=1, keepdims=True), lower.max(axis=1, keepdims=True)
        reach = np.minimum(low + np.arange(int((high - low).max()) + 1), high)
        first_along = np.arange(len(index))[:, None] * reach.shape[1] - low
        on_device = _upload(
            device,
            first_row + reach,
            left,
            right,
            first_along + upper,
            first_along + lower,
            *weights,
        )
        reached, left_t, right_t, above, below, up_w, down_w, left_w, right_w = on_device
        reach_values = _rows(source_rows, reached)
        along = recipe.multiply_add(
            _columns(reach_values, left_t),
            left_w[:, None],
            _columns(reach_values, right_t) * right_w[:, None],
        )
        along_rows = along.view(-1, along.shape[2])
        return recipe.multiply_add(
            _rows(along_rows, above),
            up_w[:, :, None],
            _rows(along_rows, below) * down_w[:, :, None],
        )
    # Channels-last: v00 w00 + v01 w01 + v10 w10 + v11 w11, each weight a product of two.
    on_device = _upload(device, first_row + upper, first_row + lower, left, right, *weights)
    up, down, left_t, right_t, *weights_t = on_device
    up_w, down_w = (w[:, :, None] for w in weights_t[:2])
    left_w, right_w = (w[:, None] for w in weights_t[2:])
    above, below = _rows(source_rows, up), _rows(source_rows, down)
    total = _columns(above, right_t) * (up_w * right_w)
    total = recipe.multiply_add(_columns(above, left_t), up_w * left_w, total)
    total = recipe.multiply_add(_columns(below, left_t), down_w * left_w, total)
    return recipe.multiply_add(_columns(below, right_t), down_w * right_w, total)


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` (``[rows, w]``) at ``index`` (``[n, k]``): ``[n, k, w]``."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


def _columns(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Columns of each ``[n, a, b]`` crop at its own ``index`` (``[n, k]``): ``[n, a, k]``."""
    n, a, _ = values.shape
    return values.gather(2, index[:, None, :].expand(n, a, index.shape[1]))


def _upload(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Host arrays (int64 or float32) as tensors on ``device``, in one copy: each launch of a
    copy to a GPU costs more than the bytes."""
    arrays = tuple(a.astype(np.int64 if a.dtype.kind in "iu" else np.float32) for a in arrays)
    blobs = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    spans = [len(blob) + (-len(blob)) % 8 for blob in blobs]  # keeps every part 8-byte aligned
    packed = np.zeros(sum(spans), dtype=np.uint8)
    starts = np.cumsum([0, *spans[:-1]]).tolist()
    for blob, start in zip(blobs, starts, strict=True):
        packed[start : start + len(blob)] = blob
    flat = torch.from_numpy(packed).to(device)
    return [
        flat[start : start + len(blob)].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
        for a, blob, start in zip(arrays, blobs, starts, strict=True)
    ]


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


def _crop_pixels(start: np.ndarray, stop: np.ndarray, size: int, limit: int) -> np.ndarray:
    """``[n, size]`` output pixels of each crop: ``start`` to ``stop - 1``, then the last one
    again (padding that reaches no new source pixel), all within ``0 .. limit - 1``."""
    last = np.clip(stop - 1, 0, limit - 1)
    return np.minimum(start[:, None] + np.arange(size), last[:, None])
