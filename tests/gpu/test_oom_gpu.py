"""A real CUDA OOM (other tensors filling the card): no frame is lost, the cap drops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from segmentation.batching import AdaptiveBatchCap, OOMSafeRunner
from segmentation.errors import OverloadedError
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from tests.conftest import RMBG_ARCH_DIR, product_frame

pytestmark = pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
GiB = 2**30


@pytest.fixture(scope="module")
def segmentor() -> RMBG20Segmentor:
    torch.manual_seed(0)
    return RMBG20Segmentor(
        str(RMBG_ARCH_DIR),
        device="cuda",
        use_fp16=True,
        trust_remote_code=True,
        load_format="dummy",
    )


@contextmanager
def card_filled(leave_free: int) -> Iterator[None]:
    """Other tensors take all but ``leave_free`` bytes of the card for the block's duration."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, free - leave_free), dtype=torch.uint8, device="cuda")
    try:
        yield
    finally:
        del filler
        torch.cuda.empty_cache()


def test_oom_splits_batches_and_answers_every_frame(segmentor: RMBG20Segmentor) -> None:
    frames = [product_frame(1920, 1080, seed=i) for i in range(16)]
    reference = segmentor.predict(frames[:1])[0]
    cap = AdaptiveBatchCap(16, recover_after=1000)
    runner = OOMSafeRunner(segmentor.predict, cap)
    with card_filled(4 * GiB):
        results, report = runner(frames)
    print(
        f"\n4 GiB left free: OOM splits {report.oom_splits}, largest batch that ran "
        f"{report.largest_run}, cap now {cap.value}, failed frames {report.failed_frames}"
    )
    assert report.oom_splits >= 1
    assert report.failed_frames == 0
    assert 1 <= cap.value < 16
    assert len(results) == 16
    assert all(isinstance(r, np.ndarray) and r.shape == (1080, 1920) for r in results)
    assert np.abs(results[0].astype(int) - reference.astype(int)).max() <= 1


def test_a_frame_that_cannot_fit_gets_503_and_the_model_recovers(
    segmentor: RMBG20Segmentor,
) -> None:
    frames = [product_frame(1920, 1080, seed=i) for i in range(3)]
    runner = OOMSafeRunner(segmentor.predict, AdaptiveBatchCap(4))
    with card_filled(64 * 2**20):
        starved, starved_report = runner(frames)
    assert starved_report.failed_frames == 3
    assert all(isinstance(r, OverloadedError) and r.retry_after_s for r in starved)
    results, report = runner(frames)
    assert report.failed_frames == 0
    assert all(isinstance(r, np.ndarray) for r in results)
