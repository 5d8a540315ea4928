"""The client's own logic: Retry-After, backoff, answer parsing, input encoding."""

from __future__ import annotations

import email.utils
import io
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from segmentation.encoders import b64, encode_rle, rgba_png
from segmentation_client.client import (
    FrameError,
    Image,
    RetryPolicy,
    Segmentation,
    SegmentorClient,
    parse_frames,
    parse_retry_after,
    sniff_content_type,
)
from tests.conftest import assert_cutout, encode, product_frame


def test_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (parse_retry_after(soon) or 0) <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert parse_retry_after(past) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_retry_waits_honour_the_header_with_jitter_and_a_ceiling() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_wait_s=10)
    for _ in range(50):
        assert 2.0 <= policy.wait(1, "2") <= 3.0
        assert 0.5 <= policy.wait(1, None) <= 1.0  # backoff, then doubling
        assert 2.0 <= policy.wait(3, None) <= 3.0
        assert policy.wait(1, "120") == 10


def test_typed_answers_parse_from_the_service_json() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 3:9] = 1
    second = np.zeros_like(mask)
    second[12:15, 20:25] = 1
    instance = {"score": 0.9, "class_id": 39, "class_name": "bottle"}
    answer = {
        "task": "segment",
        "frames": [
            {
                "index": 0,
                "width": 30,
                "height": 20,
                "model": "m",
                "instances": [
                    {**instance, "box": [3, 5, 9, 10], "mask": encode_rle(mask)},
                    {**instance, "box": [20, 12, 25, 15], "mask": encode_rle(second)},
                ],
            },
            {"index": 1, "error": {"code": "invalid_image", "message": "not an image"}},
        ],
    }
    found, failed = parse_frames(answer)
    assert isinstance(found, Segmentation) and found.instances[0].class_name == "bottle"
    assert np.array_equal(found.instances[0].mask(), mask)
    assert np.array_equal(found.union_mask(), (mask | second) * 255)
    assert failed == FrameError(1, "invalid_image", "not an image")

    frame = product_frame(30, 20)
    alpha = np.full((20, 30), 128, np.uint8)
    cutouts = parse_frames(
        {
            "task": "remove-background",
            "frames": [{"index": 0, "image": b64(rgba_png(frame, alpha))}],
        }
    )
    assert isinstance(cutouts[0], Image)
    assert_cutout(cutouts[0].to_array(), frame)
    assert np.array_equal(cutouts[0].alpha(), alpha)


def test_inputs_are_encoded_by_type(tmp_path) -> None:
    client = SegmentorClient("http://localhost:1", frame_format="png")
    frame = product_frame(16, 8)
    data, content_type = client.encode(frame)
    assert content_type == "image/png"
    assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(data))), frame)  # lossless
    jpeg = encode(frame)
    (tmp_path / "f.jpg").write_bytes(jpeg)
    assert client.encode(tmp_path / "f.jpg") == (jpeg, "image/jpeg")
    assert client.encode(jpeg) == (jpeg, "image/jpeg")
    assert sniff_content_type(b"RIFF0000WEBPVP8 ") == "image/webp"
    assert sniff_content_type(b"GIF89a") == "application/octet-stream"
    client.close()
    with pytest.raises(ValueError):
        SegmentorClient("http://localhost:1", max_concurrency=0)
