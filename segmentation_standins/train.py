"""Train the product stand-ins on seeded synthetic product shots, offline.

    python -m segmentation_standins.train yolo --out DIR --seed 0
    python -m segmentation_standins.train birefnet --out DIR --seed 0

``yolo`` writes the scenes in Ultralytics' segmentation dataset format (one polygon per
visible instance) and trains the real YOLO11n-seg architecture from its yaml (no pretrained
weights, no downloads: AMP's self-check is off, so are plots and their fonts), then saves the
EMA weights in FP16 without the optimizer (~6 MB). ``birefnet`` trains the product BiRefNet
stand-in (``product_birefnet/birefnet.py``) on the union mattes with a plain PyTorch loop
(BCE on every map + soft IoU on the last), on frames resized exactly as
:class:`~segmentation.models.rmbg20_segmentor.RMBG20Segmentor` resizes them, and saves
safetensors. Both print a JSON summary (losses, validation scores) as their last line.

Training scenes use seed ``--seed`` (scene ``i`` for image ``i``); validation uses seed
``--seed + 1``; the tests hold out other seeds still.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from segmentation_standins import synthetic

logger = logging.getLogger(__name__)

VAL_SEED_OFFSET = 1


def frame_size(seed: int, index: int) -> tuple[int, int]:
    """(width, height) of training scene ``index``: landscape, square and portrait frames."""
    rng = np.random.default_rng([seed, index, 7])
    width = int(rng.integers(256, 481))
    aspect = float(rng.choice([0.5625, 0.75, 1.0, 1.33]))
    return width, round(width * aspect)


def _render(args: tuple[int, int]) -> synthetic.Scene:
    seed, index = args
    width, height = frame_size(seed, index)
    return synthetic.scene(seed, index, width, height)


def render_many(seed: int, count: int, workers: int) -> list[synthetic.Scene]:
    jobs = [(seed, i) for i in range(count)]
    if workers <= 1:
        return [_render(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_render, jobs, chunksize=16))


# --- YOLO ------------------------------------------------------------------------------------


def polygon(mask: np.ndarray) -> np.ndarray | None:
    """The outline of ``mask``'s largest piece as ``[K, 2]`` normalised x, y (None if empty)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    points = cv2.approxPolyDP(largest, 0.7, True).reshape(-1, 2).astype(np.float32)
    if len(points) < 3:
        return None
    # Pixel centres to pixel edges: the contour runs through the outermost pixels' centres.
    points += 0.5
    height, width = mask.shape
    result: np.ndarray = points / np.array([width, height], dtype=np.float32)
    return result


def write_yolo_split(scenes: Sequence[synthetic.Scene], root: Path, split: str) -> None:
    from PIL import Image

    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(images / f"{i:05d}.jpg", quality=92)
        lines = []
        for mask, class_id in zip(scene.masks, scene.class_ids, strict=True):
            points = polygon(mask)
            if points is not None:
                coords = " ".join(f"{v:.5f}" for v in points.reshape(-1))
                lines.append(f"{int(class_id)} {coords}")
        (labels / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")


def _results_without_polars() -> None:
    """Ultralytics reads its results.csv with polars when it saves a checkpoint; where polars
    is not installed (it is no dependency of this project), read it with the csv module."""
    try:
        import polars  # noqa: F401
    except ImportError:
        import csv

        from ultralytics.engine.trainer import BaseTrainer

        def read_results_csv(trainer: Any) -> dict[str, list[Any]]:
            try:
                with open(trainer.csv, newline="") as handle:
                    rows = list(csv.DictReader(handle, skipinitialspace=True))
            except OSError:
                return {}
            return {key.strip(): [row[key] for row in rows] for key in (rows[0] if rows else {})}

        BaseTrainer.read_results_csv = read_results_csv  # type: ignore[method-assign]


def train_yolo(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import strip_optimizer

    _results_without_polars()

    out = Path(args.out).resolve()
    data = out / "dataset"
    started = time.monotonic()
    write_yolo_split(render_many(args.seed, args.images, args.workers), data, "train")
    write_yolo_split(render_many(args.seed + VAL_SEED_OFFSET, args.val_images, 1), data, "val")
    names = dict(enumerate(synthetic.CLASS_NAMES))
    data_yaml = data / "data.yaml"
    data_yaml.write_text(
        json.dumps(
            {"path": str(data), "train": "images/train", "val": "images/val", "names": names}
        )
    )
    rendered = time.monotonic() - started
    model: Any = YOLO("yolo11n-seg.yaml")
    model.train(
        data=str(data_yaml),
        epochs=args.epochs,
        time=args.max_minutes / 60 if args.max_minutes else None,
        imgsz=args.imgsz,
        batch=args.batch,
        workers=args.workers,
        device=args.device,
        seed=args.seed,
        deterministic=True,
        amp=False,  # AMP's self-check downloads yolo11n.pt; FP32 (TF32) is fast enough here
        plots=False,
        pretrained=False,
        project=str(out),
        name="run",
        exist_ok=True,
        verbose=False,
        patience=0,
        close_mosaic=max(1, args.epochs // 5),
    )
    best = out / "run" / "weights" / "best.pt"
    if not best.exists():
        best = out / "run" / "weights" / "last.pt"
    final = out / "product-yolo11n-seg.pt"
    strip_optimizer(best, str(final))  # EMA weights, FP16, no optimizer
    metrics = model.trainer.metrics if getattr(model, "trainer", None) else {}
    summary = {
        "model": "product-yolo11n-seg",
        "seed": args.seed,
        "images": args.images,
        "epochs_run": int(getattr(model.trainer, "epoch", -1)) + 1,
        "imgsz": args.imgsz,
        "render_s": round(rendered, 1),
        "train_s": round(time.monotonic() - started - rendered, 1),
        "metrics": {k: round(float(v), 4) for k, v in dict(metrics).items()},
        "bytes": final.stat().st_size,
    }
    return summary


# --- BiRefNet ---------------------------------------------------------------------------------


def matte_tensors(
    scenes: Sequence[synthetic.Scene], size: int
) -> tuple[Any, Any]:  # (uint8 images [N,3,S,S], float16 mattes [N,1,S,S])
    """Scenes resized to ``size`` square the way the segmentor resizes frames."""
    import torch
    import torch.nn.functional as F

    images, mattes = [], []
    for scene in scenes:
        image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float()
        alpha = torch.from_numpy(scene.alpha)[None, None]
        kwargs: dict[str, Any] = {"mode": "bilinear", "antialias": True, "align_corners": False}
        image = F.interpolate(image, size=(size, size), **kwargs)
        images.append(image.round().clamp(0, 255).to(torch.uint8))
        mattes.append(F.interpolate(alpha, size=(size, size), **kwargs).clamp(0, 1).half())
    return torch.cat(images), torch.cat(mattes)


def matte_loss(maps: Sequence[Any], target: Any) -> Any:
    """BCE on every map (target resized to it) plus a soft IoU loss on the full-size map."""
    import torch.nn.functional as F

    loss: Any = 0.0
    for logits in maps:
        resized = target
        if logits.shape[-1] != target.shape[-1]:
            resized = F.interpolate(target, size=logits.shape[-2:], mode="area")
        loss = loss + F.binary_cross_entropy_with_logits(logits, resized)
    prob = maps[-1].sigmoid()
    inter = (prob * target).flatten(1).sum(1)
    union = (prob + target - prob * target).flatten(1).sum(1)
    return loss + (1 - (inter + 1) / (union + 1)).mean()


def matte_iou(prob: Any, target: Any) -> Any:
    """Per-frame IoU of the thresholded matte (0.5) against the ground truth (0.5)."""
    pred, truth = prob >= 0.5, target >= 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


def train_birefnet(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    import segmentation_standins as standins
    from segmentation.models.rmbg20_loader import build_model
    from segmentation.models.rmbg20_segmentor import IMAGENET_MEAN, IMAGENET_STD
    from segmentation.precision import resolve_device

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    started = time.monotonic()
    train_x, train_y = matte_tensors(
        render_many(args.seed, args.images, args.workers), args.input_size
    )
    val_x, val_y = matte_tensors(
        render_many(args.seed + VAL_SEED_OFFSET, args.val_images, 1), args.input_size
    )
    rendered = time.monotonic() - started
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    code_dir = out / "product-birefnet"
    standins.write_product_birefnet_code(code_dir)
    model = build_model(code_dir, load_weights=False).train().requires_grad_(True).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    train_x, train_y = train_x.to(device), train_y.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05
    )
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    losses: list[float] = []
    step = 0
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else math.inf
    for step in range(args.steps):
        index = torch.randint(len(train_x), (args.batch,), generator=generator).to(device)
        x, y = train_x[index].float(), train_y[index].float()
        flip = torch.rand(args.batch, generator=generator).to(device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
        # brightness/contrast jitter, so the matte does not hang on exact colours
        gain = torch.empty(args.batch, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
        x = ((x - 128) * gain.to(device) + 128).clamp(0, 255)
        loss = matte_loss(model((x - mean) / std), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 200 == 0:
            logger.info("step %d loss %.4f", step, losses[-1])
        if time.monotonic() > deadline:
            logger.warning("stopping at step %d: --max-minutes reached", step)
            break
    model.eval()
    ious = []
    with torch.inference_mode():
        for start in range(0, len(val_x), 32):
            x = val_x[start : start + 32].to(device).float()
            prob = model((x - mean) / std)[-1].sigmoid()
            ious.append(matte_iou(prob, val_y[start : start + 32].to(device).float()))
    iou = torch.cat(ious)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    final = out / "product-birefnet.safetensors"
    save_file(state, str(final))
    tail = losses[-100:]
    return {
        "model": "product-birefnet",
        "seed": args.seed,
        "images": args.images,
        "steps_run": step + 1,
        "input_size": args.input_size,
        "render_s": round(rendered, 1),
        "train_s": round(time.monotonic() - started - rendered, 1),
        "final_loss": round(sum(tail) / len(tail), 4),
        "val_matte_iou_mean": round(float(iou.mean()), 4),
        "val_matte_iou_min": round(float(iou.min()), 4),
        "parameters": sum(v.numel() for v in state.values()),
        "bytes": final.stat().st_size,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["yolo", "birefnet"])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="scenes, initialisation and order")
    parser.add_argument("--images", type=int, default=3000, help="training scenes")
    parser.add_argument("--val-images", type=int, default=200, help="validation scenes")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, default=None, help="default: yolo 64, birefnet 32")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop training after this")
    parser.add_argument("--epochs", type=int, default=40, help="yolo: epochs")
    parser.add_argument("--imgsz", type=int, default=320, help="yolo: training image size")
    parser.add_argument("--steps", type=int, default=4000, help="birefnet: optimiser steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="birefnet: peak learning rate")
    parser.add_argument("--input-size", type=int, default=256, help="birefnet: model input size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.model == "yolo":
        args.batch = args.batch or 64
        if args.device == "auto":
            import torch

            args.device = "0" if torch.cuda.is_available() else "cpu"
        summary = train_yolo(args)
    else:
        args.batch = args.batch or 32
        summary = train_birefnet(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
