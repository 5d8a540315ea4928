"""The real segmentor deployments' classes, without Ray Serve: encoded images in, what the
client gets out. The model replicas decode next to the model and compose and encode the
answer; these tests run that path on the CPU with the trained stand-ins, including the
device-decode path (torchvision's JPEG decoder on the model's device, here the CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation.encoders import jpeg
from segmentation.errors import InvalidImageError, InvalidRequestError
from segmentation.imaging import decode_image, probe_image
from segmentation.options import DetectOptions
from segmentation_client.wire import cutout_rgba
from segmentation_service.autoscaling import HELD_FRAMES
from segmentation_service.segmentors import RMBGDeployment, YoloDeployment
from tests.conftest import encode, product_frame

T = TypeVar("T")
ARGS = {"device": "cpu", "warmup_size": (96, 128)}


#: One event loop for the module: a replica's queue and events belong to the loop that first
#: used them, as a Serve replica's belong to its one loop.
LOOP = asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return LOOP.run_until_complete(coro)


@pytest.fixture(scope="module", autouse=True)
def _loop_closed_after_the_module() -> Iterator[None]:
    yield
    for task in asyncio.all_tasks(LOOP):
        task.cancel()
    LOOP.run_until_complete(asyncio.sleep(0))
    LOOP.close()


@pytest.fixture(scope="module")
def rmbg(standin_cache: Path) -> Any:
    replica = RMBGDeployment.func_or_class({**ARGS, "model": standins.PRODUCT_RMBG})
    run(replica.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.05}))
    return replica


@pytest.fixture(scope="module")
def yolo(standin_cache: Path) -> Any:
    replica = YoloDeployment.func_or_class({**ARGS, "model": standins.PRODUCT_YOLO})
    run(replica.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.05}))
    return replica


def _png_pixels(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)))


def test_a_cutout_comes_back_as_the_png_the_client_gets(rmbg: Any) -> None:
    frame = product_frame(160, 120, seed=4)
    image = probe_image(encode(frame, "PNG"))
    png = run(rmbg.remove_background(image, "rgba"))
    matte = _png_pixels(run(rmbg.remove_background(image, "mask")).data)
    raw = run(rmbg.remove_background(image, "raw"))
    assert matte.shape == (120, 160) and matte.dtype == np.uint8
    assert (raw.width, raw.height, raw.data) == (160, 120, matte.tobytes())
    assert (png.width, png.height) == (160, 120)
    png = png.data
    # The cutout composed on the model's device is the frame's pixels where alpha > 0.
    np.testing.assert_array_equal(_png_pixels(png), cutout_rgba(frame, matte))
    assert 0 < int((matte > 0).sum()) < matte.size  # a product was found, not everything


def test_jpegs_decoded_on_the_model_device_give_the_cpu_path_answer(
    rmbg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = jpeg(product_frame(160, 120, seed=5), quality=95)
    image = probe_image(data)
    on_cpu_threads = run(rmbg.remove_background_each([image, image], "rgba"))
    monkeypatch.setattr(type(rmbg), "device_decodes", lambda self, image: True)
    broken = probe_image(data[: len(data) // 2])
    on_device = run(rmbg.remove_background_each([image, broken, image], "rgba"))
    assert isinstance(on_device[1], InvalidImageError)  # alone: the others are answered
    for answer in (on_device[0], on_device[2]):
        got = _png_pixels(answer.data).astype(int)
        want = _png_pixels(on_cpu_threads[0].data).astype(int)
        # torchvision's and Pillow's libjpeg builds may round a few values apart
        assert got.shape == want.shape and np.abs(got - want).max() <= 3


def test_product_crops_are_cut_in_the_replica_from_one_decode(rmbg: Any) -> None:
    frame = product_frame(200, 150, seed=6)
    image = probe_image(encode(frame, "PNG"))
    boxes = [(10, 20, 90, 110), (100, 0, 200, 150)]
    cutouts = run(rmbg.cutouts(image, boxes))
    for (left, top, right, bottom), png in zip(boxes, cutouts, strict=True):
        assert (png.width, png.height) == (right - left, bottom - top)
        pixels = _png_pixels(png.data)
        assert pixels.shape == (bottom - top, right - left, 4)
        shown = pixels[..., 3] > 0
        np.testing.assert_array_equal(pixels[shown][:, :3], frame[top:bottom, left:right][shown])
    with pytest.raises(InvalidRequestError, match="not inside"):
        run(rmbg.cutouts(image, [(0, 0, 201, 10)]))


def test_unknown_class_ids_are_refused_before_any_frame_is_queued(yolo: Any) -> None:
    image = probe_image(encode(product_frame(128, 96), "PNG"))
    with pytest.raises(InvalidRequestError, match="not among this model's 4 classes"):
        run(yolo.segment(image, DetectOptions(classes=(1, 99))))
    found = run(yolo.segment(image, DetectOptions(classes=(1,))))
    assert (found["width"], found["height"]) == (128, 96)
    assert all(inst["class_id"] == 1 for inst in found["instances"])


def test_yolo_decodes_jpegs_on_the_device_like_the_cpu_path(
    yolo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = jpeg(product_frame(320, 240, seed=8), quality=95)
    image = probe_image(data)
    on_threads = run(yolo.segment(image))
    monkeypatch.setattr(type(yolo), "device_decodes", lambda self, image: True)
    on_device = run(yolo.segment(image))
    assert len(on_device["instances"]) == len(on_threads["instances"]) > 0
    assert decode_image(data).shape[:2] == (240, 320)


def test_decoded_pixels_a_replica_holds_are_bounded(rmbg: Any) -> None:
    """Past ``max_host_pixels``, a frame that needs a CPU decode is 503, retryable."""
    from segmentation.errors import OverloadedError

    image = probe_image(encode(product_frame(160, 120), "PNG"))
    rmbg.host_pixels = rmbg.args.max_host_pixels - image.pixels + 1  # as if others held them
    try:
        with pytest.raises(OverloadedError, match="max_host_pixels"):
            run(rmbg.remove_background(image, "mask"))
    finally:
        rmbg.host_pixels = 0
    assert len(run(rmbg.remove_background(image, "mask")).data) > 0


def test_jpegs_decoded_ahead_of_their_batch_give_the_answers_decoded_in_it(
    rmbg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``decode_ahead``: the next batch's JPEGs are decoded on the decode thread while one
    runs; the answers are those of decoding in the batch, a broken JPEG still fails alone,
    and a product's crops still share one decode."""
    data = jpeg(product_frame(160, 120, seed=5), quality=95)
    image, broken = probe_image(data), probe_image(data[: len(data) // 2])
    frames = [image, broken, image] * 3  # three batches of at most 4
    monkeypatch.setattr(type(rmbg), "device_decodes", lambda self, image: True)
    in_batch = run(rmbg.remove_background_each(frames, "rgba"))
    boxes = [(10, 20, 90, 110), (100, 0, 160, 120)]
    crops_in_batch = run(rmbg.cutouts(image, boxes))
    assert rmbg.frames_decoded_ahead == 0
    monkeypatch.setattr(rmbg, "args", rmbg.args.model_copy(update={"decode_ahead": True}))
    ahead = run(rmbg.remove_background_each(frames, "rgba"))
    assert rmbg.frames_decoded_ahead == len(frames)  # the broken ones were tried too
    assert run(rmbg.record_autoscaling_stats()) == {HELD_FRAMES: 0.0}  # none left counted
    for index, (want, got) in enumerate(zip(in_batch, ahead, strict=True)):
        if index % 3 == 1:
            assert isinstance(want, InvalidImageError) and isinstance(got, InvalidImageError)
        else:
            assert got.data == want.data
    crops_ahead = run(rmbg.cutouts(image, boxes))
    assert rmbg.frames_decoded_ahead == len(frames) + 1  # two crops, one decode
    assert [c.data for c in crops_ahead] == [c.data for c in crops_in_batch]
