"""RMBG-2.0's Swin blocks compiled ahead of time (AOTInductor) on the CPU.

The published architecture (random weights, RMBG_ARCH_DIR) at a 64-pixel input: the block
body over plain tensors against the fast path's, then one geometry's program compiled for
real (tens of seconds on a CPU; a whole model's 16 take minutes, so its full artifact is a
GPU test, tests/gpu/test_compile_cache_gpu.py) and loaded by a segmentor from its artifact
directory: the blocks of that geometry call it, every other block and batch size runs the
eager body, and the mattes are the uncompiled fast path's.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segmentation import compile_cache
from segmentation.models import rmbg20_blocks, rmbg20_fast
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation_standins import synthetic
from tests.conftest import RMBG_ARCH_DIR, published_rmbg

pytestmark = pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)

SIZE = 64
MAX_BATCH = 3
COMPILED = (*rmbg20_fast.DEFAULT_STEPS, rmbg20_fast.COMPILE)


def _frames(count: int) -> list[np.ndarray]:
    return [synthetic.scene(7400 + i, 0, 96, 64).image for i in range(count)]


def _with_artifacts(directory: Path) -> RMBG20Segmentor:
    return published_rmbg(input_size=SIZE, optimized=COMPILED, compile_cache=directory)


@pytest.fixture(scope="module")
def uncompiled() -> RMBG20Segmentor:
    torch.manual_seed(0)
    return published_rmbg(input_size=SIZE)


@pytest.fixture(scope="module")
def calls(uncompiled: RMBG20Segmentor) -> list[rmbg20_blocks.BlockCall]:
    with rmbg20_blocks.recorded_calls(uncompiled.model) as seen:
        uncompiled.predict(_frames(2))
    return seen


@pytest.fixture(scope="module")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, calls: list[rmbg20_blocks.BlockCall]
) -> Path:
    """An artifact directory whose key's programs cover one geometry (the first block's)."""
    directory = tmp_path_factory.mktemp("compiled")
    status = _with_artifacts(directory).compile_status
    assert status is not None
    programs = compile_cache.artifact_path(directory, status["key"], ahead=True)
    rmbg20_blocks.export_programs(calls[:1], programs, MAX_BATCH)
    assert not [p.name for p in directory.iterdir() if p != programs]  # no temporary left
    return directory


def test_the_block_body_over_tensors_is_the_fast_paths_on_every_geometry(
    uncompiled: RMBG20Segmentor, calls: list[rmbg20_blocks.BlockCall]
) -> None:
    # Both passes of the backbone (the input and its half): 4 stages x (shifted or not) each.
    assert len(calls) == 16
    assert len({call.geometry for call in calls}) == 16
    assert len({call.geometry.name for call in calls}) == 16  # the packages' file names
    blocks = [m for m in uncompiled.model.modules() if "_fast_body" in m.__dict__]
    assert blocks and all(rmbg20_blocks.plain_block(b) for b in blocks)
    checked = 0
    with torch.inference_mode():
        for block in blocks:
            for call in calls:
                if call.inputs[3].data_ptr() != block.norm1.weight.data_ptr():
                    continue  # another block's call
                height, width = call.geometry.height, call.geometry.width
                plan = rmbg20_fast.window_plan(block, height, width, call.x)
                eager = rmbg20_fast._swin_block_body(
                    block,
                    call.x,
                    height,
                    width,
                    plan.padded,
                    plan.to_windows,
                    plan.from_windows,
                    plan.bias,
                )
                mine = rmbg20_blocks.block_tensors(call.x, call.inputs, call.geometry)
                assert torch.allclose(mine, eager, atol=1e-5, rtol=1e-5), call.geometry.name
                checked += 1
    assert checked == len(calls)


def test_the_artifacts_program_runs_its_geometrys_blocks_and_the_mattes_stay(
    artifacts: Path, uncompiled: RMBG20Segmentor, calls: list[rmbg20_blocks.BlockCall]
) -> None:
    segmentor = _with_artifacts(artifacts)
    status = segmentor.compile_status
    assert status is not None
    assert status["state"] == "artifact loaded: blocks compiled ahead of time"
    assert status["programs"] == "programs for 1 Swin block geometries, batches 2-3"
    assert Path(status["artifact"]).name == f"{status['key']}{compile_cache.AOT_SUFFIX}"
    assert segmentor.inference_path == "sdpa+windows+decoder+deform+resample+compile"
    assert segmentor._programs is not None
    ran: Counter[int] = Counter()
    programs = segmentor._programs.programs
    (geometry,) = programs
    assert geometry == calls[0].geometry
    program = programs[geometry]

    def counted(x: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> Any:
        ran[x.shape[0]] += 1
        return program(x, inputs)

    programs[geometry] = counted  # type: ignore[index]
    frames = _frames(4)
    for count in (1, 2, 3, 4):
        got = segmentor.predict(frames[:count])
        want = uncompiled.predict(frames[:count])
        for a, b in zip(got, want, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, count
    # the first stage's unshifted block, once per pass at its input size: batches 2 and 3
    # only (a single frame and a batch over the programs' largest run the eager body)
    assert ran == {2: 1, 3: 1}
    # 48 block calls a forward: at 1 and 4 frames all eager for the batch size, at 2 and 3
    # one program call and 47 eager for their geometry
    report = segmentor.info().compile
    assert report is not None
    assert report["block_calls"] == {"batch": 96, "program": 2, "geometry": 94}


def test_programs_that_fail_to_load_are_named_and_the_model_serves_uncompiled(
    artifacts: Path, tmp_path: Path
) -> None:
    """A package the loader cannot take fails in a test process first (a loader that
    crashes must not take the replica with it); without Inductor's caches beside them the
    fast path runs uncompiled."""
    status = _with_artifacts(tmp_path).compile_status
    assert status is not None and status["state"].startswith("not compiled: no artifact")
    broken = compile_cache.artifact_path(tmp_path, status["key"], ahead=True)
    broken.mkdir()
    (broken / "bad.pt2").write_bytes(b"not a package")
    manifest = {"min_batch": 2, "max_batch": 3, "programs": [{"file": "bad.pt2"}]}
    (broken / rmbg20_blocks.MANIFEST).write_text(json.dumps(manifest))
    segmentor = _with_artifacts(tmp_path)
    status = segmentor.compile_status
    assert status is not None
    assert status["programs"].startswith(
        f"not used: RuntimeError: torch {torch.__version__}'s AOTInductor loader failed on "
        "bad.pt2 in a test process (status 1"
    ), status["programs"]
    assert status["state"].startswith("not compiled: no artifact for this model")
    assert status["artifact"].endswith(compile_cache.SUFFIX)  # what it looked for next
    assert rmbg20_fast.COMPILE not in segmentor.fast_steps
    assert segmentor.predict(_frames(2))[0].shape == (64, 96)
    (broken / rmbg20_blocks.MANIFEST).write_text(json.dumps({**manifest, "programs": []}))
    status = _with_artifacts(tmp_path).compile_status
    assert status is not None and "lists no programs" in status["programs"]


def test_the_loaders_verdict_at_build_time_is_kept_and_read_for_the_same_torch(
    artifacts: Path, tmp_path: Path
) -> None:
    (built,) = artifacts.glob(f"*{compile_cache.AOT_SUFFIX}")
    manifest = json.loads((built / rmbg20_blocks.MANIFEST).read_text())
    assert manifest["loader"] == {"torch": torch.__version__, "loads": True}
    # A verdict of failure for this torch is believed without another test process (the
    # packages here would load: the refusal can only come from the manifest).
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    failed = {"torch": torch.__version__, "loads": False, "error": "the loader crashed"}
    (copy / rmbg20_blocks.MANIFEST).write_text(json.dumps({**manifest, "loader": failed}))
    with pytest.raises(RuntimeError, match=r"^the loader crashed, when the programs were built$"):
        rmbg20_blocks.load_programs(copy, torch.device("cpu"))
    # A success at build time is tried again in a test process (this host may differ).
    loads = {"torch": torch.__version__, "loads": True}
    (copy / manifest["programs"][0]["file"]).write_bytes(b"not a package any more")
    (copy / rmbg20_blocks.MANIFEST).write_text(json.dumps({**manifest, "loader": loads}))
    with pytest.raises(RuntimeError, match=r"AOTInductor loader failed on .* in a test process"):
        rmbg20_blocks.load_programs(copy, torch.device("cpu"))
    shutil.copy(built / manifest["programs"][0]["file"], copy)
    # Built with another torch: tested again here, and loaded.
    other = {"torch": "0.0.0", "loads": False, "error": "the loader crashed"}
    (copy / rmbg20_blocks.MANIFEST).write_text(json.dumps({**manifest, "loader": other}))
    assert len(rmbg20_blocks.load_programs(copy, torch.device("cpu")).programs) == 1


def test_export_refuses_nothing_to_compile_and_leaves_no_half_directory(tmp_path: Path) -> None:
    target = tmp_path / "key.aoti"
    with pytest.raises(ValueError, match="nothing to compile"):
        rmbg20_blocks.export_programs([], target, MAX_BATCH)
    assert not list(tmp_path.iterdir())


def test_a_block_the_tensor_body_does_not_compute_is_not_plain() -> None:
    """Another activation, another MLP, a LayerNorm without bias, training mode: such a
    block keeps its own body (a block of a model of its own: the fixtures stay as they are)."""
    model = published_rmbg(input_size=SIZE).model
    block = next(m for m in model.modules() if "_fast_body" in m.__dict__)
    assert rmbg20_blocks.plain_block(block)
    act = block.mlp.act
    changes: list[tuple[Callable[[], None], Callable[[], None]]] = [
        (
            lambda: setattr(block.mlp, "act", torch.nn.GELU(approximate="tanh").eval()),
            lambda: setattr(block.mlp, "act", act),
        ),
        (
            lambda: setattr(block.mlp, "dwconv", torch.nn.Identity().eval()),
            lambda: delattr(block.mlp, "dwconv"),
        ),
        (lambda: block.attn.train(), lambda: block.attn.eval()),
    ]
    for change, undo in changes:
        change()
        assert not rmbg20_blocks.plain_block(block)
        undo()
        assert rmbg20_blocks.plain_block(block)
    block.norm2.bias = None
    assert not rmbg20_blocks.plain_block(block)
