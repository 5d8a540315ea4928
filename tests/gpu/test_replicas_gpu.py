"""The segmentor deployments' data path on a GPU, without Ray Serve: encoded frames in,
nvJPEG on the device, cutouts composed on the device, PNG bytes out. A frame that fails to
decode failing alone is tested on the CPU with the same code
(tests/unit/test_segmentor_replicas.py)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.encoders import jpeg
from segmentation.imaging import decode_image, probe_image
from segmentation_service.segmentors import RMBGDeployment, YoloDeployment
from tests.conftest import RMBG_ARCH_DIR, product_frame

T = TypeVar("T")
LOOP = asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return LOOP.run_until_complete(coro)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_rmbg_replica_decodes_jpegs_on_the_card_and_answers_pngs() -> None:
    replica = RMBGDeployment.func_or_class(
        {
            "model": str(RMBG_ARCH_DIR.resolve()),
            "load_format": "dummy",
            "trust_remote_code": True,
            "device": "cuda",
            "gpu_memory_fraction": 0.6,
        }
    )
    run(replica.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.02}))
    assert replica.memory_cap is not None and replica.memory_cap >= 4
    data = jpeg(product_frame(1920, 1080, seed=2), quality=90)
    image = probe_image(data)
    assert replica.device_decodes(image)
    answers = run(replica.remove_background_each([image, image, image], "rgba"))
    # The mask from a batch of the same shape: another batch size may pick other kernels.
    masks = run(replica.remove_background_each([image, image, image], "mask"))
    matte = pixels(masks[0].data)
    cutout = pixels(answers[0].data)
    assert cutout.shape == (1080, 1920, 4) and matte.shape == (1080, 1920)
    assert answers[1] == answers[0] == answers[2]  # one batch, the same frame three times
    np.testing.assert_array_equal(cutout[..., 3], matte)
    # Composed on the card: black where alpha is 0, the decoded frame elsewhere (nvJPEG
    # rounds a little differently from libjpeg, so the pixels are compared within 3 levels).
    assert not cutout[matte == 0][:, :3].any()
    shown = matte > 0
    reference = decode_image(data).astype(int)
    assert np.abs(cutout[..., :3].astype(int)[shown] - reference[shown]).mean() < 3
    info = run(replica.info())
    assert info["frames"]["ok"] >= 4 and info["codec"]["host_pixels"] == 0
    torch.cuda.empty_cache()


def test_yolo_replica_on_the_card_with_the_trained_stand_in() -> None:
    replica = YoloDeployment.func_or_class(
        {
            "model": "standin:product-yolo11n-seg",
            "input_size": 320,
            "device": "cuda",
            "gpu_memory_fraction": 0.3,
        }
    )
    run(replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.02}))
    from segmentation_standins import synthetic

    scene = synthetic.scene(3, 0, 1920, 1080)
    data = jpeg(scene.image, quality=90)
    image = probe_image(data)
    found = run(replica.segment_each([image, image], None))
    assert found[0] == found[1]
    assert len(found[0]["instances"]) > 0


def test_yolo_decoding_ahead_on_its_own_stream_answers_as_decoding_in_the_batch() -> None:
    """``decode_ahead``: the next batch's JPEGs decoded by nvJPEG on the decode thread's
    stream while a batch runs give the instances of decoding first thing in the batch."""
    args = {
        "model": "standin:product-yolo11n-seg",
        "input_size": 320,
        "device": "cuda",
        "gpu_memory_fraction": 0.3,
    }
    from segmentation_standins import synthetic

    images = [
        probe_image(jpeg(synthetic.scene(seed, 0, 1920, 1080).image, quality=90))
        for seed in range(12)
    ]
    answers = {}
    for ahead in (False, True):
        replica = YoloDeployment.func_or_class({**args, "decode_ahead": ahead})
        run(replica.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.02}))
        answers[ahead] = run(replica.segment_each(images, None))
        info = run(replica.info())
        assert info["codec"]["frames_decoded_ahead"] == (len(images) if ahead else 0)
        del replica
        torch.cuda.empty_cache()
    # Batches may form differently in the two runs, and another batch size may pick other
    # kernels: the same instances, boxes and scores within rounding.
    for got, want in zip(answers[True], answers[False], strict=True):
        assert [i["class_id"] for i in got["instances"]] == [
            i["class_id"] for i in want["instances"]
        ]
        for a, b in zip(got["instances"], want["instances"], strict=True):
            assert np.abs(np.subtract(a["box"], b["box"])).max() <= 1.0
            assert abs(a["score"] - b["score"]) <= 0.01
    assert sum(len(found["instances"]) for found in answers[True]) > 0
