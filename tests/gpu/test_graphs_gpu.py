"""CUDA-graph replay of YOLO11-seg: the same answers as eager runs, at every batch size."""

from __future__ import annotations

import pytest
import torch

from segmentation.batching import batch_buckets
from segmentation.models.yolo_segmentor import YoloSegmentor
from tests.conftest import product_frame

pytestmark = pytest.mark.gpu


def test_graph_replay_matches_eager_and_other_sizes_still_run() -> None:
    torch.manual_seed(0)
    model = YoloSegmentor("yolo11n-seg.yaml", device="cuda")
    frames = [product_frame(1920, 1080, seed=i) for i in range(13)]
    other = [product_frame(640, 480, seed=50 + i) for i in range(3)]
    model.batch_buckets = batch_buckets(16)
    with torch.inference_mode():
        eager = {n: model.forward(model.preprocess(frames[:n])[0]) for n in (1, 3, 13)}
        eager_other = model.forward(model.preprocess(other)[0])
    assert model.capture_graphs((1080, 1920), model.batch_buckets)
    assert model.graph_batch_sizes == [1, 2, 4, 8, 12, 16]
    with torch.inference_mode():
        for _ in range(2):  # twice: a replay must not disturb the next one
            for n, (preds, protos) in eager.items():
                got_preds, got_protos = model.forward(model.preprocess(frames[:n])[0])
                assert got_preds.shape == preds.shape and got_protos.shape == protos.shape
                torch.testing.assert_close(got_preds, preds, atol=1e-2, rtol=1e-2)
                torch.testing.assert_close(got_protos, protos, atol=1e-2, rtol=1e-2)
            # A frame size without graphs runs eagerly, with anchors of its own.
            preds, protos = model.forward(model.preprocess(other)[0])
            torch.testing.assert_close(preds, eager_other[0], atol=1e-2, rtol=1e-2)
    found = model.predict(frames[:5])
    assert [(d.width, d.height) for d in found] == [(1920, 1080)] * 5
