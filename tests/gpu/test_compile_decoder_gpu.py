"""RMBG-2.0 with its decoder compiled (the fast path's ``compile-decoder`` step) for its
largest batch size: one graph, and under CUDA graphs the mattes of the uncompiled fast path,
within 2/255 of FP32 after the sigmoid."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils

from segmentation.models import rmbg20_fast
from segmentation.models.rmbg20_segmentor import _in_fp32
from tests.conftest import RMBG_ARCH_DIR, product_frame, published_rmbg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
    ),
]


def _gap(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float().sigmoid() - reference.float().sigmoid()).abs().max())


def test_compiled_decoder_under_graphs_gives_the_fast_paths_mattes() -> None:
    torch.manual_seed(0)
    model = published_rmbg(
        "cuda", optimized=(*rmbg20_fast.DEFAULT_STEPS, rmbg20_fast.COMPILE_DECODER)
    )
    assert rmbg20_fast.COMPILE_DECODER in model.fast_steps
    frames = [product_frame(1920, 1080, seed=i) for i in range(2)]
    model.batch_buckets = (1, 2)  # compiled for a batch of 2, the largest
    with torch.inference_mode():
        batch = model.preprocess(frames)
        graphs = torch._dynamo.utils.counters["stats"]
        before = graphs["unique_graphs"]
        compiled = model.forward(batch)  # a batch of 2: the compiled decoder
        assert graphs["unique_graphs"] > before  # the decoder went through Inductor
        # One frame at a time: the same fast path with the eager decoder.
        uncompiled = torch.cat([model.forward(batch[i : i + 1]) for i in range(2)])
        with _in_fp32(model.model):
            exact = model.forward(batch.float())
    assert model.capture_graphs(model.batch_buckets)
    assert (
        model.info().inference_path
        == "sdpa+windows+decoder+deform+resample+fuse+attn+compile-decoder+graphs"
    )
    with torch.inference_mode():
        replayed = model.forward(batch)
    print(
        f"\ncompiled decoder vs eager decoder: sigmoid max {_gap(compiled, uncompiled) * 255:.2f}"
        f"/255; vs FP32 {_gap(compiled, exact) * 255:.2f}/255, eager decoder "
        f"{_gap(uncompiled, exact) * 255:.2f}/255, replay {_gap(replayed, exact) * 255:.2f}/255"
    )
    assert compiled.std() > 1e-3  # a map that a wrong graph would change
    assert _gap(compiled, uncompiled) <= 2 / 255
    assert _gap(compiled, exact) <= 2 / 255
    assert _gap(replayed, exact) <= 2 / 255
