"""``segment-dataset``: a Ray Data job that segments a folder or bucket of images and videos.

    segment-dataset INPUT OUTPUT [--model rmbg|yolo] [--num-gpus 0.5] [--replicas 2]

INPUT and OUTPUT are local paths or bucket URIs (``s3://``, ``gs://``, anything pyarrow's
filesystems read). Images (``a/b.jpg``) give ``OUTPUT/a/b.png``; videos (``a/clip.mp4``) give
``OUTPUT/a/clip/frame_000000.png``... (upright: a clip's display matrix is applied); with
``--model yolo`` each also gets a ``.json`` of its instances (boxes, classes, COCO RLE
masks). Outputs are RGBA cutouts (``--output cutout``) or grayscale mattes (``--output mask``).
Two inputs that would write one file (``a.jpg`` and ``a.png``; ``clip.mp4`` beside
``clip/frame_000000.png``) are refused before anything runs, naming both, and so is an OUTPUT
that cannot be written; the summary counts the frame files found on disk at the end.

Files are read and decoded by CPU tasks; the segmentors run in a pool of ``--replicas`` actors
(``map_batches`` with ``--num-gpus`` each, so 0.5 puts two on one GPU) built from the same
classes as the service; cutouts are encoded and written by CPU tasks. Ray Data streams, so
memory stays bounded however large the input. On a laptop it starts a local Ray; on a cluster
(``--address auto`` or ``RAY_ADDRESS``) the same command spreads over every node, reading and
writing a bucket. A file that cannot be decoded is reported and skipped; the others go on.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from segmentation.options import MODEL_KINDS, ModelKind

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
#: A video's frame files (``frame_000000``... past a million frames, more digits).
_FRAME_NAME = re.compile(r"frame_\d{6,}")


def _filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path in it, for a local path or a bucket URI."""
    import os

    from pyarrow import fs

    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(uri)


def list_inputs(uri: str) -> list[dict[str, str]]:
    """Every image and video under ``uri`` (or ``uri`` itself), sorted, relative names kept."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == fs.FileType.File:
        entries, base = [info], str(PurePosixPath(root).parent)
    else:
        entries = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        base = root
    rows = []
    for entry in entries:
        suffix = PurePosixPath(entry.path).suffix.lower()
        if entry.type != fs.FileType.File or suffix not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            continue
        kind = "image" if suffix in IMAGE_SUFFIXES else "video"
        relative = str(PurePosixPath(entry.path).relative_to(base))
        rows.append({"uri": uri, "path": entry.path, "name": relative, "kind": kind})
    return sorted(rows, key=lambda row: row["name"])


def output_stem(name: str) -> str:
    """Where input ``name``'s results go, under OUTPUT, without suffix: ``a/b.jpg`` -> ``a/b``
    (an image's ``a/b.png`` and ``.json``; a video's directory ``a/b/``)."""
    return str(PurePosixPath(name).with_suffix(""))


def find_collisions(inputs: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """``(input, other input, output they share)`` for every two inputs that would write one
    file: images or videos of one stem (``a.jpg``, ``a.png``), an image whose output is one
    of a video's frames (``clip/frame_000000.png`` beside ``clip.mp4``), or a video whose
    frame directory is an image's output file (``a.png.mp4`` beside ``a.png``)."""
    images: dict[str, str] = {}
    videos: dict[str, str] = {}
    clashes: list[tuple[str, str, str]] = []
    for row in inputs:
        stem = output_stem(row["name"])
        table, shared = (images, f"{stem}.png") if row["kind"] == "image" else (videos, f"{stem}/")
        if stem in table:
            clashes.append((table[stem], row["name"], shared))
        else:
            table[stem] = row["name"]
    for stem, name in images.items():
        parent, leaf = posixpath.split(stem)
        if parent in videos and _FRAME_NAME.fullmatch(leaf):
            clashes.append((videos[parent], name, f"{stem}.png"))
    for stem, name in videos.items():
        base, suffix = posixpath.splitext(stem)
        if suffix in (".png", ".json") and base in images:
            clashes.append((images[base], name, stem))
    return clashes


def check_output(uri: str) -> None:
    """Raise ``OSError`` unless OUTPUT is (or can be made) a directory this job can write
    files in: a file there, a parent that is a file or a missing permission shows before
    Ray starts. A probe file is written and removed."""
    import pyarrow
    from pyarrow import fs

    try:
        filesystem, root = _filesystem(uri)
        if filesystem.get_file_info(root).type == fs.FileType.File:
            raise NotADirectoryError(f"{uri} is a file, not a directory")
        filesystem.create_dir(root, recursive=True)
        probe = str(PurePosixPath(root) / ".segment-dataset-write-check")
        with filesystem.open_output_stream(probe) as out:
            out.write(b"")
        filesystem.delete_file(probe)
    except (pyarrow.ArrowException, ValueError) as exc:
        raise OSError(f"{uri}: {exc}") from None


def files_on_disk(uri: str, paths: set[str]) -> set[str]:
    """Those of ``paths`` (under OUTPUT) that are files now: one listing of OUTPUT."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    listing = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    return {entry.path for entry in listing if entry.type == fs.FileType.File} & paths


def _row(name: str, frame: int, image: np.ndarray | None, error: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "frame": frame,
        "image": image if image is not None else np.zeros((1, 1, 3), np.uint8),
        "error": error,
    }


def load_frames(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``flat_map`` step: the decoded RGB frames of one file (frame -1 for an image).

    A file that cannot be read gives one row with ``error`` set, so it is reported, not lost.
    """
    from segmentation.errors import SegmentationError
    from segmentation.imaging import decode_image
    from segmentation_client.video import VideoError, VideoReader

    filesystem, _ = _filesystem(item["uri"])
    name = item["name"]
    try:
        with filesystem.open_input_file(item["path"]) as handle:
            if item["kind"] == "image":
                yield _row(name, -1, decode_image(handle.read()))
                return
            with VideoReader(handle, name) as reader:
                for index, frame in enumerate(reader):
                    yield _row(name, index, frame)
    except (SegmentationError, VideoError, OSError) as exc:
        logger.warning("skipping %s: %s", name, exc)
        yield _row(name, -1, None, f"{type(exc).__name__}: {exc}")


class SegmentBatch:
    """``map_batches`` actor: the service's segmentor classes on a batch of decoded frames."""

    def __init__(
        self,
        model: ModelKind,
        model_path: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        detect: dict[str, Any] | None = None,
    ) -> None:
        from segmentation.config import load_settings
        from segmentation.factory import build_segmentor
        from segmentation.local import LocalRunner
        from segmentation.options import DetectOptions

        segmentor = build_segmentor(model, load_settings(), model=model_path, device=device)
        self.runner = LocalRunner(
            model, segmentor, batch_size=batch_size, detect=DetectOptions(**(detect or {}))
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, error in enumerate(batch["error"]) if not error]
        alphas: list[np.ndarray] = [np.zeros(image.shape[:2], np.uint8) for image in batch["image"]]
        instances = ["null"] * len(alphas)
        outputs = self.runner([batch["image"][i] for i in ok]) if ok else []
        for index, output in zip(ok, outputs, strict=True):
            alphas[index] = output.alpha
            instances[index] = json.dumps(output.instances)
        return {**batch, "alpha": _column(alphas), "instances": np.array(instances)}


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """An object column of arrays of different shapes (Ray stores it as a ragged tensor)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


@dataclass(frozen=True)
class WriteOutputs:
    """``map_batches`` task: encode each frame's cutout (or matte) and write it under OUTPUT."""

    output: str
    kind: str = "cutout"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from segmentation.encoders import cutout_rgba

        filesystem, root = _filesystem(self.output)
        written = []
        for name, frame, image, alpha, instances, error in zip(
            batch["name"],
            batch["frame"],
            batch["image"],
            batch["alpha"],
            batch["instances"],
            batch["error"],
            strict=True,
        ):
            if error:
                written.append("")
                continue
            stem = str(PurePosixPath(root) / output_stem(str(name)))
            target = f"{stem}/frame_{int(frame):06d}" if int(frame) >= 0 else stem
            filesystem.create_dir(str(PurePosixPath(target).parent), recursive=True)
            pixels = cutout_rgba(image, alpha) if self.kind == "cutout" else alpha
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
            with filesystem.open_output_stream(target + ".png") as out:
                out.write(buffer.getvalue())
            if instances != "null":
                with filesystem.open_output_stream(target + ".json") as out:
                    out.write(instances.encode() if isinstance(instances, str) else instances)
            written.append(target + ".png")
        return {
            "name": batch["name"],
            "frame": batch["frame"],
            "output": np.array(written),
            "error": batch["error"],
        }


def build_dataset(
    inputs: list[dict[str, str]],
    output: str,
    *,
    model: ModelKind,
    model_path: str | None = None,
    device: str | None = None,
    num_gpus: float = 0.0,
    replicas: int = 1,
    batch_size: int = 8,
    output_kind: str = "cutout",
    detect: dict[str, Any] | None = None,
) -> Any:
    """The lazy Ray dataset of the job: read and decode, segment, encode and write."""
    import ray

    frames = ray.data.from_items(inputs).flat_map(load_frames)
    segmented = frames.map_batches(
        SegmentBatch,
        fn_constructor_kwargs={
            "model": model,
            "model_path": model_path,
            "device": device,
            "batch_size": batch_size,
            "detect": detect,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=num_gpus,
        # A GPU actor still needs a CPU slot for its Python; on CPU it is the model's core.
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=replicas),
    )
    return segmented.map_batches(
        WriteOutputs(output, output_kind), batch_size=batch_size, batch_format="numpy"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segment-dataset",
        description="Segment every image and video under a folder or bucket with Ray Data.",
    )
    parser.add_argument("input", help="folder, file or bucket URI (s3://..., gs://...)")
    parser.add_argument("output", help="folder or bucket URI for the results")
    parser.add_argument("--model", choices=MODEL_KINDS, default="rmbg")
    parser.add_argument("--output-kind", choices=("cutout", "mask"), default="cutout")
    parser.add_argument(
        "--model-path",
        help="model source (default RMBG_MODEL / YOLO_MODEL), e.g. standin:tiny-birefnet",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda")
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="GPUs per segmentor actor, fractional to share a card (default 1 where Ray sees "
        "a GPU, else 0)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="segmentor actors (default 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--conf", type=float, help="yolo: minimum detection score")
    parser.add_argument(
        "--address", help="Ray cluster address: auto, ray://host:10001, or local (a new one)"
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of a new local Ray (default all)")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.batch_size < 1:
        parser.error("--replicas and --batch-size must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        inputs = list_inputs(args.input)
    except (FileNotFoundError, OSError) as exc:
        print(f"segment-dataset: error: {exc}", file=sys.stderr)
        return 2
    if not inputs:
        print(f"segment-dataset: error: no images or videos under {args.input}", file=sys.stderr)
        return 2
    clashes = find_collisions(inputs)
    if clashes:
        for first, second, shared in clashes:
            print(
                f"segment-dataset: error: {first} and {second} would both write "
                f"{posixpath.join(args.output, shared)}",
                file=sys.stderr,
            )
        print("segment-dataset: rename one of each pair; nothing was written", file=sys.stderr)
        return 2
    try:
        check_output(args.output)
    except OSError as exc:
        print(f"segment-dataset: error: cannot write the output: {exc}", file=sys.stderr)
        return 2

    import ray

    try:
        ray.init(address=args.address, num_cpus=args.num_cpus if args.address == "local" else None)
    except Exception as exc:  # not started, not reachable, timed out: nothing was processed
        said = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(
            f"segment-dataset: error: could not start or reach Ray at --address "
            f"{args.address} ({type(exc).__name__}: {said}); nothing was processed",
            file=sys.stderr,
        )
        return 2
    num_gpus = args.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    detect = {"conf": args.conf} if args.conf is not None else None
    dataset = build_dataset(
        inputs,
        args.output,
        model=args.model,
        model_path=args.model_path,
        device=args.device,
        num_gpus=num_gpus,
        replicas=args.replicas,
        batch_size=args.batch_size,
        output_kind=args.output_kind,
        detect=detect,
    )
    outputs: set[str] = set()
    failed = 0
    for row in dataset.iter_rows():
        if row["error"]:
            failed += 1
            print(f"segment-dataset: skipped {row['name']}: {row['error']}", file=sys.stderr)
        else:
            outputs.add(str(row["output"]))
    # What is on disk, not what the tasks said: a file written twice or lost counts once or
    # not at all.
    written = files_on_disk(args.output, outputs)
    for missing in sorted(outputs - written):
        print(f"segment-dataset: {missing} was written but is not there", file=sys.stderr)
    print(
        f"segment-dataset: {len(written)} frames written to {args.output} from "
        f"{len(inputs)} files" + (f"; {failed} files could not be read" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed or len(written) < len(outputs) else 0


if __name__ == "__main__":
    sys.exit(main())
