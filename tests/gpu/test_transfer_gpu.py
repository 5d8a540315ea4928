"""A batch's outputs cross from the GPU in one pinned copy: the same values as ``.cpu()``
frame by frame, for every kind of output RMBG-2.0's postprocess makes; the copy runs on a
stream of its own, beside the next batch's work, and the outputs' memory is not reused
before it ends."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from segmentation import transfer
from segmentation.compose import compose_on_device, plain_cutout
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.options import CutoutOptions, parse_margin
from segmentation.transfer import copy_to_host, host_arrays


def _tensors() -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randint(
            0, 256, (1080, 1920, 4), dtype=torch.uint8, device="cuda", generator=generator
        ),
        torch.randn((3, 7), device="cuda", generator=generator),  # 84 bytes: the next is aligned
        torch.arange(35, dtype=torch.int64, device="cuda").reshape(5, 7).t(),  # not contiguous
        torch.empty((0, 3), dtype=torch.uint8, device="cuda"),
        torch.ones((2, 2), dtype=torch.float16, device="cuda"),
        torch.tensor([[True, False, True]], device="cuda"),
        torch.arange(6, dtype=torch.uint8).reshape(2, 3),  # a host tensor among them
    ]


def test_the_copies_equal_cpu_copies_are_pinned_and_outlive_later_batches() -> None:
    tensors = _tensors()
    arrays = host_arrays(tensors)
    expected = [tensor.cpu().numpy().copy() for tensor in tensors]
    for array, tensor, want in zip(arrays, tensors, expected, strict=True):
        assert array.shape == want.shape and array.dtype == want.dtype
        np.testing.assert_array_equal(array, want)
        pinned = array.size == 0 or torch.from_numpy(array).is_pinned()
        assert pinned == tensor.is_cuda or array.size == 0  # the host tensor keeps its memory
    for _ in range(3):  # more batches through the caching host allocator: ours still held
        host_arrays([torch.zeros_like(t) for t in tensors if t.is_cuda])
    for array, want in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(array, want)


def test_without_pinned_memory_each_is_copied_as_cpu_does(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty = torch.empty

    def refuse_pinned(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("pin_memory"):
            raise RuntimeError("CUDA error: out of memory (pinned host allocation)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(transfer.torch, "empty", refuse_pinned)
    tensors = _tensors()
    for array, tensor in zip(host_arrays(tensors), tensors, strict=True):
        np.testing.assert_array_equal(array, tensor.cpu().numpy())


def test_rmbg_postprocess_gives_each_frames_own_copy() -> None:
    """Mattes, plain cutouts and composed outputs of one batch (a crop past the frame's edge,
    a background, a scaled output, a mask) equal what each frame copied on its own gives."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    sizes = [(1080, 1920), (480, 640), (720, 1280), (300, 400), (1080, 1920)]
    logits = (torch.randn((len(sizes), 1, 64, 64), device="cuda", generator=generator) * 4).half()
    pixels = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device="cuda", generator=generator)
        for h, w in sizes
    ]
    options = [
        None,
        CutoutOptions(crop=True, crop_margin=parse_margin("50%")),
        CutoutOptions(background=(255, 255, 255, 255)),
        CutoutOptions(max_pixels=50_000),
        CutoutOptions(output="mask"),
    ]
    segmentor = object.__new__(RMBG20Segmentor)  # postprocess uses no model state
    got = segmentor.postprocess(logits, sizes, [None, *pixels[1:]], options)
    probs = logits.float().sigmoid()
    for index, (height, width) in enumerate(sizes):
        alpha = torch.nn.functional.interpolate(
            probs[index : index + 1], size=(height, width), mode="bilinear", align_corners=False
        )
        matte = alpha.mul(255.0).round().to(torch.uint8)[0, 0]
        if index == 0:
            np.testing.assert_array_equal(got[0], matte.cpu().numpy())
            continue
        chosen = options[index]
        assert chosen is not None
        item = compose_on_device(pixels[index], matte, chosen)
        expected = item.on_host(*(t.cpu().numpy() for t in item.tensors()))
        assert got[index].subject == expected.subject
        assert got[index].foreground == expected.foreground
        np.testing.assert_array_equal(got[index].pixels, expected.pixels)
    plain = segmentor.postprocess(logits[:1], sizes[:1], pixels[:1])
    matte = torch.nn.functional.interpolate(
        probs[:1], size=sizes[0], mode="bilinear", align_corners=False
    )
    expected_plain = plain_cutout(pixels[0], matte.mul(255.0).round().to(torch.uint8)[0, 0])
    np.testing.assert_array_equal(plain[0], expected_plain.cpu().numpy())


def _busy_default_stream() -> torch.Tensor:
    """Queue about a second of matrix products on the current (default) stream."""
    x = torch.randn((4096, 4096), device="cuda")
    for _ in range(200):
        x = torch.tanh(x @ x)
    return x


def test_the_copy_runs_beside_later_work_and_its_memory_is_not_reused_meanwhile() -> None:
    """``copy_to_host`` waits for the work queued before it, not for work queued after it on
    the current stream; the copied tensors' memory, freed by the caller at once, is not handed
    to that later work before the copy ends."""
    generator = torch.Generator(device="cuda").manual_seed(2)
    tensors = [
        torch.randint(
            0, 256, (1080, 1920, 4), dtype=torch.uint8, device="cuda", generator=generator
        )
        for _ in range(8)
    ]
    expected = [tensor.cpu().numpy().copy() for tensor in tensors]
    torch.cuda.synchronize()
    copy = copy_to_host(tensors)
    del tensors  # the caller lets go: the allocator must keep their memory for the copy
    reused = [torch.full((1080, 1920, 4), 7, dtype=torch.uint8, device="cuda") for _ in range(8)]
    busy = _busy_default_stream()
    arrays = copy.wait()
    assert not torch.cuda.current_stream().query()  # the later work was still running
    for array, want in zip(arrays, expected, strict=True):
        assert torch.from_numpy(array).is_pinned()
        np.testing.assert_array_equal(array, want)
    torch.cuda.synchronize()
    assert all(int(t.min()) == 7 == int(t.max()) for t in reused)
    assert bool(torch.isfinite(busy).all())
