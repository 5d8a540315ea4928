"""CUDA-graph replay of YOLO11-seg and RMBG-2.0: the same answers as eager runs, at every batch
size, in the replicas and in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segmentation_standins as standins
from segmentation.batching import batch_buckets
from segmentation.local import LocalRunner
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor
from segmentation_standins import synthetic
from segmentation_standins.quality import mask_iou, matte_iou
from tests.conftest import RMBG_ARCH_DIR, product_frame

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


def _probability_gap(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference after the sigmoid: what the mattes are made of."""
    return float((logits.float().sigmoid() - reference.float().sigmoid()).abs().max())


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_rmbg_graph_replay_matches_eager_and_survives_an_fp32_recompute() -> None:
    """Replayed graphs answer as the eager FP16 forward does, and an FP32 recompute of one
    overflowed frame leaves them reading the same FP16 weights: the same bits as before it.

    Replay and eager are two FP16 evaluations of the same network, and nothing makes them
    round alike: cuBLAS and cuDNN choose a kernel per call (by shape, workspace, stream), and
    a captured call may get another. On an H100 their logits differed by up to 0.0269 (969 of
    3,145,728 beyond the 0.02 + 0.02|x| this test used to allow): at most 1.7/255 after the
    sigmoid, whose slope is at most 1/4. The FP16 path itself is held to 2/255 of FP32 after
    the sigmoid (test_fp16_gpu.py), not to 0.02 on logits, so the graphs are held to that
    contract and to what users get: within 2/255 of FP32 and of eager after the sigmoid, the
    same uint8 mattes within two levels, and on average no further from FP32 than eager is (a
    scale-free check: a replay of stale inputs or of the wrong weights is off by the size of
    the logits, not by rounding). ``python -m benchmarks.graph_diff`` measures each of these
    quantities beside these limits (its section f), and where replay and eager part.
    """
    from segmentation.models.rmbg20_segmentor import _in_fp32

    torch.manual_seed(0)
    model = RMBG20Segmentor(
        str(RMBG_ARCH_DIR.resolve()), device="cuda", trust_remote_code=True, load_format="dummy"
    )
    frames = [product_frame(1920, 1080, seed=i) for i in range(3)]
    sizes = [frame.shape[:2] for frame in frames]
    model.batch_buckets = (1, 2, 4)
    with torch.inference_mode():
        batch = model.preprocess(frames)
        eager = model.forward(batch)
        with _in_fp32(model.model):  # the same weights in FP32: the reference for both paths
            exact = model.forward(batch.float())
    assert model.capture_graphs(model.batch_buckets)
    assert model.graph_batch_sizes == [1, 2, 4]
    assert model.info().inference_path == "sdpa+windows+decoder+deform+resample+fuse+attn+graphs"
    with torch.inference_mode():
        graphed = model.forward(batch)
        eager_error = float((eager.float() - exact).abs().mean())
        replay_error = float((graphed.float() - exact).abs().mean())
        alpha_gap = max(
            int(np.abs(a.astype(int) - b.astype(int)).max())
            for a, b in zip(
                model.postprocess(eager, sizes), model.postprocess(graphed, sizes), strict=True
            )
        )
        print(
            f"\nreplay vs eager: logits max {(graphed - eager).abs().max():.4f}, "
            f"sigmoid max {_probability_gap(graphed, eager) * 255:.2f}/255, "
            f"mattes max {alpha_gap} levels; mean error vs FP32 replay {replay_error:.2e}, "
            f"eager {eager_error:.2e}"
        )
        assert _probability_gap(eager, exact) <= 2 / 255
        assert _probability_gap(graphed, exact) <= 2 / 255
        assert _probability_gap(graphed, eager) <= 2 / 255
        assert alpha_gap <= 2
        assert replay_error <= 1.5 * eager_error
        broken = graphed.clone()
        broken[1] = float("inf")  # as if FP16 had overflowed on frame 1
        fixed = model._recompute_non_finite(batch, broken)
        assert torch.isfinite(fixed).all() and model.fp32_recomputed == 1
        assert torch.equal(fixed[[0, 2]], graphed[[0, 2]].float())  # only frame 1 recomputed
        assert _probability_gap(eager[1], fixed[1]) <= 2 / 255  # FP16 within 2/255 of FP32
        # The FP16 weights came back in the same memory: the graphs replay the same bits.
        assert torch.equal(model.forward(batch), graphed)
    assert next(model.model.parameters()).dtype == torch.float16


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_rmbg_graphs_at_the_service_buckets_fit_in_half_a_card() -> None:
    """Every bucket up to 16 captured in one pool within half of the card (a replica's share)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(0.5)
    try:
        torch.manual_seed(0)
        model = RMBG20Segmentor(
            str(RMBG_ARCH_DIR.resolve()),
            device="cuda",
            trust_remote_code=True,
            load_format="dummy",
        )
        model.batch_buckets = batch_buckets(16)
        assert model.capture_graphs(model.batch_buckets), model.graph_error
        assert model.graph_batch_sizes == [1, 2, 4, 8, 12, 16]
        frames = [product_frame(1920, 1080, seed=i) for i in range(16)]
        mattes = model.predict(frames)
        print(f"\npeak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of {total / 2**30:.0f}")
        assert len(mattes) == 16 and mattes[15].shape == (1080, 1920)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_in_process_runner_replays_a_graph_with_the_eager_answers() -> None:
    """``LocalRunner(cuda_graphs=True)`` (``segment-video --cuda-graphs``) captures one graph
    at its batch size after the first batch and gives the eager run's mattes and instances
    (trained stand-ins on held-out synthetic scenes; the last batch is a short one)."""
    scenes = [synthetic.scene(4000 + i, 0, 640, 480) for i in range(10)]
    frames = [scene.image for scene in scenes]

    def rmbg() -> RMBG20Segmentor:
        return RMBG20Segmentor(standins.PRODUCT_RMBG, device="cuda", input_size=256)

    eager = LocalRunner("rmbg", rmbg(), batch_size=4)(frames)
    model = rmbg()
    runner = LocalRunner("rmbg", model, batch_size=4, cuda_graphs=True)
    graphed = runner(frames)
    assert model.graph_batch_sizes == [4] and runner.graph_seconds is not None
    assert model.info().inference_path.endswith("graphs")
    for a, b, scene in zip(eager, graphed, scenes, strict=True):
        assert np.abs(a.alpha.astype(int) - b.alpha.astype(int)).max() <= 2
        assert matte_iou(b.alpha, scene) >= 0.9

    def yolo() -> YoloSegmentor:
        return YoloSegmentor(standins.PRODUCT_YOLO, device="cuda", imgsz=320)

    eager = LocalRunner("yolo", yolo(), batch_size=4)(frames)
    model = yolo()
    graphed = LocalRunner("yolo", model, batch_size=4, cuda_graphs=True)(frames)
    assert model.graph_batch_sizes == [4]
    for a, b in zip(eager, graphed, strict=True):
        assert a.instances and b.instances is not None
        assert [i["class_id"] for i in a.instances] == [i["class_id"] for i in b.instances]
        assert (
            np.abs(
                np.subtract([i["box"] for i in a.instances], [i["box"] for i in b.instances])
            ).max()
            <= 1.0
        )
        assert mask_iou(a.alpha > 0, b.alpha > 0) >= 0.98


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_in_process_quick_start_gives_the_same_mattes() -> None:
    """``LocalRunner(quick_start=True)`` (``segment-video``) runs attention on PyTorch's own
    kernels instead of cuDNN's (its flag is off during the forward): the same mattes within two
    levels (each within one of FP32, measured), and the cuDNN choice is back
    for everything else once the call returns."""
    torch.manual_seed(0)
    model = RMBG20Segmentor(
        str(RMBG_ARCH_DIR.resolve()), device="cuda", trust_remote_code=True, load_format="dummy"
    )
    frames = [product_frame(1920, 1080, seed=i) for i in range(3)]
    cudnn_attention: list[bool] = []  # whether cuDNN's attention was allowed in each forward
    forward = model.forward

    def recording(batch: torch.Tensor) -> torch.Tensor:
        cudnn_attention.append(torch.backends.cuda.cudnn_sdp_enabled())
        return forward(batch)

    model.forward = recording  # type: ignore[method-assign]
    default = LocalRunner("rmbg", model, batch_size=4)(frames)
    assert cudnn_attention == [True]
    quick = LocalRunner("rmbg", model, batch_size=4, quick_start=True)(frames)
    assert cudnn_attention == [True, False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # back for everything else
    for a, b in zip(default, quick, strict=True):
        assert np.abs(a.alpha.astype(int) - b.alpha.astype(int)).max() <= 2


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_rmbg_without_the_deform_step_runs_eagerly_and_says_why() -> None:
    """torchvision's deformable convolution is not recorded by a capture: without the
    ``deform`` step no graph is captured, the forward stays eager and the reason is kept."""
    model = RMBG20Segmentor(
        str(RMBG_ARCH_DIR.resolve()),
        device="cuda",
        trust_remote_code=True,
        load_format="dummy",
        optimized=("sdpa", "windows", "decoder"),
    )
    assert model.capture_graphs((1, 2)) is False
    assert model.graph_batch_sizes == []
    assert model.info().inference_path == "sdpa+windows+decoder"
    assert model.graph_error is not None
    assert "calls torchvision's deform_conv2d" in model.graph_error
    assert "enable the 'deform' step" in model.graph_error
    frames = [product_frame(320, 240, seed=1)]
    mattes = model.predict(frames)
    assert mattes[0].shape == (240, 320) and mattes[0].dtype == np.uint8
    del model
    torch.cuda.empty_cache()
