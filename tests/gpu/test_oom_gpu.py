"""A real CUDA OOM (other tensors filling the card): no frame is lost, the cap drops."""

from __future__ import annotations

from collections.abc import Iterator

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


def _fill_card(leave_free: int) -> Iterator[torch.Tensor]:
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, free - leave_free), dtype=torch.uint8, device="cuda")
    try:
        yield filler
    finally:
        del filler
        torch.cuda.empty_cache()


@pytest.fixture
def card_almost_full() -> Iterator[torch.Tensor]:
    yield from _fill_card(4 * GiB)


def test_oom_splits_batches_and_answers_every_frame(
    segmentor: RMBG20Segmentor, card_almost_full: torch.Tensor
) -> None:
    frames = [product_frame(1920, 1080, seed=i) for i in range(16)]
    cap = AdaptiveBatchCap(16, recover_after=1000)
    runner = OOMSafeRunner(segmentor.predict, cap)
    results, report = runner(frames)
    print(
        f"\nfree before: 4 GiB; OOM splits {report.oom_splits}, largest run "
        f"{report.largest_run}, cap now {cap.value}, failed {report.failed_frames}"
    )
    assert report.oom_splits >= 1
    assert report.failed_frames == 0
    assert cap.value < 16
    assert len(results) == 16
    assert all(isinstance(r, np.ndarray) and r.shape == (1080, 1920) for r in results)
    reference = segmentor.predict(frames[:1])[0]
    assert np.abs(results[0].astype(int) - reference.astype(int)).max() <= 1


def test_a_frame_that_cannot_fit_gets_503_and_the_model_recovers(
    segmentor: RMBG20Segmentor,
) -> None:
    frames = [product_frame(1920, 1080, seed=i) for i in range(3)]
    cap = AdaptiveBatchCap(4)
    runner = OOMSafeRunner(segmentor.predict, cap)
    for _ in _fill_card(64 * 2**20):
        results, report = runner(frames)
        assert report.failed_frames == 3
        assert all(isinstance(r, OverloadedError) and r.retry_after_s for r in results)
    results, report = runner(frames)
    assert report.failed_frames == 0
    assert all(isinstance(r, np.ndarray) for r in results)
