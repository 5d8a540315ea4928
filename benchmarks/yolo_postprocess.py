"""YOLO's postprocess at a served batch size: the batch path against frame by frame.

At batch 64 of the trained stand-in on an H100 the forward replays in ~3.4 ms; NMS, masks at
frame size and their RLE took ~108 ms frame by frame (Ultralytics' NMS 24.7 ms, the frames'
boxes, masks and strings 82 ms). This times the segmentor's steps on one batch of synthetic
product shots (decoded on the device, as a replica does), both postprocess paths, and checks
that the two find the same instances, boxes, scores and strings; ``torch_ops`` counts the
operators each path dispatches for the batch (on a GPU each costs the replica host time,
whatever its size).

    python -m benchmarks.yolo_postprocess --batch 64 --out yolo-postprocess.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.checked import finish, median_ms
from benchmarks.frames import frame_set
from segmentation.device_decode import decode_jpegs_on
from segmentation.imaging import EncodedImage
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation.options import DetectOptions


class _OpCount(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(call: Any) -> int:
    with _OpCount() as counter:
        call()
    return counter.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="standin:product-yolo11n-seg")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frame-size", default="1920x1080", help="WxH")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.frame_size.split("x"))
    shots = frame_set("synthetic", width, height, count=min(16, args.batch))
    jpegs = [
        EncodedImage(shots.jpegs[i % len(shots.jpegs)], width, height) for i in range(args.batch)
    ]
    model = YoloSegmentor(args.model, device=args.device, imgsz=args.input_size)
    device = model.device
    frames = decode_jpegs_on(device, jpegs)
    options = [DetectOptions()] * len(frames)
    report: dict[str, Any] = {"model": args.model, "batch": args.batch, "device": str(device)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["cuda_graphs"] = model.capture_graphs((height, width), (args.batch,))
    with torch.inference_mode():
        batch, boxes = model.preprocess(frames)
        preds, protos = model.forward(batch)
        batched = model.postprocess(preds, protos, boxes, options)
        by_frame = model.postprocess_frame_by_frame(preds, protos, boxes, options)
        report["ms"] = {
            "preprocess": median_ms(lambda: model.preprocess(frames), device, args.runs),
            "forward": median_ms(lambda: model.forward(batch), device, args.runs),
            "postprocess (batch)": median_ms(
                lambda: model.postprocess(preds, protos, boxes, options), device, args.runs
            ),
            "postprocess (frame by frame)": median_ms(
                lambda: model.postprocess_frame_by_frame(preds, protos, boxes, options),
                device,
                args.runs,
            ),
        }
        report["torch_ops"] = {
            "postprocess (batch)": dispatched_ops(
                lambda: model.postprocess(preds, protos, boxes, options)
            ),
            "postprocess (frame by frame)": dispatched_ops(
                lambda: model.postprocess_frame_by_frame(preds, protos, boxes, options)
            ),
        }
    report["instances_per_frame"] = round(sum(len(d.instances) for d in batched) / len(frames), 2)
    report["same_instances_and_strings"] = all(
        a.instances == b.instances for a, b in zip(batched, by_frame, strict=True)
    )
    return finish(report, args.out, report["same_instances_and_strings"])


if __name__ == "__main__":
    raise SystemExit(main())
