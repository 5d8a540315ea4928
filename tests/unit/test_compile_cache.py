"""Compiled artifacts (RMBG_COMPILE_CACHE) on the CPU.

What an artifact carries is tested with Inductor for real, across processes: a function
compiled in one process and saved is compiled in a fresh process (its own empty Inductor
cache) with every graph found in the artifact, none compiled again. What the segmentor does
with its artifact directory is tested with the trained stand-in, which has no Swin blocks to
compile, so nothing compiles there: the key, and the state ``/v1/models`` reports when the
artifact is missing, unreadable, or loaded for a model with nothing to compile. The published
architecture's blocks compiled from an artifact are a GPU test
(tests/gpu/test_compile_cache_gpu.py): on a CPU they take minutes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import segmentation_standins as standins
from segmentation import compile_cache
from segmentation.config import load_settings
from segmentation.factory import build_segmentor
from segmentation.models import rmbg20_blocks, rmbg20_fast
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation_standins import synthetic
from tests.conftest import RMBG_ARCH_DIR, published_rmbg, python_json

SIZE = 128
COMPILED = (*rmbg20_fast.DEFAULT_STEPS, rmbg20_fast.COMPILE)

#: A process compiling one small function as the fast path compiles (``rmbg20_fast``'s
#: Inductor settings); ``save`` or ``load`` an artifact at argv[2]; with argv[3] ``shadowed``,
#: a module that imports whatever attribute is asked of it is imported before torch, as
#: Cython's ``cython.cimports.libc`` is in a Ray worker. Prints the output's sum and Inductor's
#: cache counters.
COMPILE = """
import importlib, json, sys, types

def importer(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise AttributeError(name) from exc

if sys.argv[3] == "shadowed":
    shim = types.ModuleType("a_shim_that_imports")
    shim.__getattr__ = importer
    sys.modules[shim.__name__] = shim
import torch
from torch._dynamo.utils import counters
from segmentation import compile_cache
from segmentation.models import rmbg20_fast

def body(x):
    return torch.sin(x) * 2 + torch.cos(x * 3).sum(-1, keepdim=True)

mode, path = sys.argv[1], sys.argv[2]
if mode == "load":
    compile_cache.load_artifact(__import__("pathlib").Path(path))
x = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 10
out = rmbg20_fast._inductor(body, dynamic=None)(x)
assert torch.allclose(out, body(x), atol=1e-5)
saved = compile_cache.save_artifact(__import__("pathlib").Path(path)) if mode == "save" else 0
print(json.dumps({"sum": float(out.sum()), "saved": saved, "inductor": dict(counters["inductor"])}))
"""


def _compile(
    mode: str, artifact: Path, inductor_dir: Path, imports: str = "plain"
) -> dict[str, Any]:
    return python_json(["-c", COMPILE, mode, str(artifact), imports], inductor_dir)


def test_an_artifact_saved_in_one_process_compiles_every_graph_in_another(tmp_path: Path) -> None:
    artifact = tmp_path / "artifacts" / f"key{compile_cache.SUFFIX}"
    built = _compile("save", artifact, tmp_path / "inductor-build")
    assert built["inductor"].get("fxgraph_cache_miss", 0) >= 1  # it did compile
    assert artifact.stat().st_size == built["saved"] > 0
    assert artifact.stat().st_mode & 0o777 == compile_cache.shared_mode(0o666)  # not private
    assert not [p.name for p in artifact.parent.iterdir() if p != artifact]  # no temp left
    loaded = _compile("load", artifact, tmp_path / "inductor-loaded")
    assert loaded["inductor"].get("fxgraph_cache_hit", 0) >= 1, loaded
    assert loaded["inductor"].get("fxgraph_cache_miss", 0) == 0, loaded
    assert loaded["sum"] == built["sum"]
    # Without the artifact a fresh process compiles the graph again.
    cold = _compile("none", artifact, tmp_path / "inductor-cold")
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 1, cold


def test_a_process_that_imported_another_module_first_finds_the_graphs(tmp_path: Path) -> None:
    # Pickle names a memory format by the first module in sys.modules that reaches it, and
    # Inductor's graph keys hold pickled metadata: in a Ray worker (a module imported before
    # torch) every key differed from the tool's, and a GPU replica compiled for minutes.
    artifact = tmp_path / f"key{compile_cache.SUFFIX}"
    built = _compile("save", artifact, tmp_path / "inductor-build")
    loaded = _compile("load", artifact, tmp_path / "inductor-loaded", imports="shadowed")
    assert loaded["inductor"].get("fxgraph_cache_hit", 0) >= 1, loaded
    assert loaded["inductor"].get("fxgraph_cache_miss", 0) == 0, loaded
    assert loaded["sum"] == built["sum"]


def test_only_inductors_graph_keys_pickle_dtypes_by_name(tmp_path: Path) -> None:
    from torch._inductor.codecache import FxGraphCachePickler

    rmbg20_fast.pickle_by_name()
    rmbg20_fast.pickle_by_name()  # again: the same, once
    key_pickler = FxGraphCachePickler(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()))
    assert b"torch_attribute" in key_pickler.dumps(torch.contiguous_format)
    assert b"torch_attribute" in key_pickler.dumps(torch.float16)
    # Everything else pickles as torch writes it: weights-only loads still read dtypes.
    saved = tmp_path / "state.pt"
    torch.save({"dtype": torch.float16, "t": torch.tensor([0, 1, 2], dtype=torch.uint16)}, saved)
    loaded = torch.load(saved, weights_only=True)
    assert loaded["dtype"] is torch.float16
    assert loaded["t"].dtype == torch.uint16 and loaded["t"].tolist() == [0, 1, 2]
    assert b"torch_attribute" not in pickle.dumps((torch.float16, torch.channels_last))


@pytest.fixture
def steps_asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The steps each segmentor built here handed the fast path (the real ``optimize``
    runs; its argument is recorded)."""
    asked: list[tuple[str, ...]] = []
    real = rmbg20_fast.optimize

    def recording(model: torch.nn.Module, steps: Any = rmbg20_fast.DEFAULT_STEPS) -> Any:
        asked.append(tuple(steps))
        return real(model, steps)

    monkeypatch.setattr(rmbg20_fast, "optimize", recording)
    return asked


def _standin(cache: Path | None, **options: Any) -> RMBG20Segmentor:
    return RMBG20Segmentor(
        standins.PRODUCT_RMBG,
        device="cpu",
        input_size=options.pop("input_size", SIZE),
        optimized=COMPILED,
        compile_cache=cache,
        **options,
    )


def test_without_its_artifact_the_model_serves_uncompiled_and_says_how_to_build_it(
    tmp_path: Path, steps_asked: list[tuple[str, ...]]
) -> None:
    segmentor = _standin(tmp_path / "empty")
    assert steps_asked == [rmbg20_fast.DEFAULT_STEPS]  # the compile step left out
    status = segmentor.compile_status
    assert status is not None
    assert status["state"].startswith("not compiled: no artifact for this model, device and code")
    assert f"python -m segmentation.compile_cache {tmp_path / 'empty'}" in status["state"]
    assert status["artifact"] == str(tmp_path / "empty" / f"{status['key']}.inductor")
    assert segmentor.info().compile == status
    assert rmbg20_fast.COMPILE not in segmentor.fast_steps
    frame = synthetic.scene(7200, 0, 160, 120).image
    plain = RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=SIZE)
    assert np.array_equal(segmentor.predict([frame])[0], plain.predict([frame])[0])


def test_an_unreadable_artifact_is_reported_and_the_model_serves_uncompiled(
    tmp_path: Path, steps_asked: list[tuple[str, ...]]
) -> None:
    key = _standin(tmp_path).compile_status["key"]  # type: ignore[index]
    (tmp_path / f"{key}{compile_cache.SUFFIX}").write_bytes(b"not an artifact")
    segmentor = _standin(tmp_path)
    assert steps_asked[-1] == rmbg20_fast.DEFAULT_STEPS
    assert segmentor.compile_status is not None
    assert segmentor.compile_status["state"].startswith("not compiled: artifact unreadable")
    frame = synthetic.scene(7201, 0, 160, 120).image
    assert segmentor.predict([frame])[0].shape == (120, 160)


def test_a_loader_test_process_that_does_not_answer_in_time_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test process of the block programs' loader is bounded: one that does not answer
    (here: a bound shorter than importing torch takes) fails the programs with a message."""
    monkeypatch.setattr(rmbg20_blocks, "PROBE_TIMEOUT_S", 0.01)
    package = tmp_path / "any.pt2"
    package.write_bytes(b"never read")
    with pytest.raises(RuntimeError) as failed:
        rmbg20_blocks.check_loader(package, -1)
    assert str(failed.value) == (
        f"torch {torch.__version__}'s AOTInductor loader failed on any.pt2 in a test process "
        "(no answer within 0.01 s)"
    )


def test_an_artifact_for_a_model_without_swin_blocks_loads_but_says_nothing_compiled(
    tmp_path: Path, steps_asked: list[tuple[str, ...]]
) -> None:
    artifact = tmp_path / "built" / "any.inductor"
    _compile("save", artifact, tmp_path / "inductor")
    key = _standin(tmp_path).compile_status["key"]  # type: ignore[index]
    (tmp_path / f"{key}{compile_cache.SUFFIX}").write_bytes(artifact.read_bytes())
    segmentor = _standin(tmp_path)
    assert steps_asked[-1] == COMPILED  # loaded: the compile step is asked for
    assert segmentor.compile_status is not None
    assert segmentor.compile_status["bytes"] == artifact.stat().st_size  # it was loaded
    assert segmentor.compile_status["state"] == (
        "not compiled: the model has no Swin blocks the fast path recognises"
    )
    assert "compile" not in segmentor.inference_path.split("+")
    segmentor.predict([synthetic.scene(7202, 0, 160, 120).image])
    report = segmentor.info().compile
    assert report is not None and report["inductor_cache"] == {"hits": 0, "misses": 0}


def test_the_key_follows_what_the_compiled_code_depends_on(tmp_path: Path) -> None:
    """Another input size, dtype, format, set of steps or weights is another artifact (never
    a stale one); the same model and settings find the same one."""
    key = _standin(tmp_path).compile_status["key"]  # type: ignore[index]
    assert _standin(tmp_path).compile_status["key"] == key  # type: ignore[index]
    assert _standin(tmp_path, input_size=SIZE * 2).compile_status["key"] != key  # type: ignore[index]
    pytest.importorskip("torchao.quantization")
    assert _standin(tmp_path, linear_format="int8").compile_status["key"] != key  # type: ignore[index]
    parts: dict[str, Any] = {
        "model_code": [],
        "fast_path_code": compile_cache.project_code(),
        "weights_sha256": "a" * 64,
        "device": torch.device("cpu"),
        "dtype": torch.float32,
        "input_size": SIZE,
        "steps": COMPILED,
        "linear_format": None,
    }
    base = compile_cache.artifact_key(compile_cache.key_parts(**parts))
    for field, other in (
        ("weights_sha256", "b" * 64),
        ("dtype", torch.float16),
        ("linear_format", "int8"),
        ("steps", rmbg20_fast.DEFAULT_STEPS),
        ("model_code", [Path(rmbg20_fast.__file__)]),
    ):
        changed = compile_cache.key_parts(**{**parts, field: other})
        assert compile_cache.artifact_key(changed) != base, field


def test_the_settings_reach_the_segmentor_and_without_a_cache_it_compiles_at_start(
    tmp_path: Path, steps_asked: list[tuple[str, ...]]
) -> None:
    settings = load_settings(
        {"DEVICE": "cpu", "RMBG_MODEL": standins.PRODUCT_RMBG, "RMBG_INPUT_SIZE": str(SIZE)},
        rmbg_compile=True,
        rmbg_compile_cache=str(tmp_path),
    )
    segmentor = build_segmentor("rmbg", settings)
    assert segmentor.info().compile["artifact"].startswith(str(tmp_path))  # type: ignore[index]
    at_start = build_segmentor(
        "rmbg",
        load_settings({"DEVICE": "cpu", "RMBG_INPUT_SIZE": str(SIZE)}, rmbg_compile=True),
        model=standins.PRODUCT_RMBG,
    )
    assert steps_asked[-1] == COMPILED  # no cache: compiled at start-up, as asked
    assert "artifact" not in (at_start.info().compile or {})
    without = build_segmentor(
        "rmbg", load_settings({"DEVICE": "cpu"}, rmbg_model=standins.PRODUCT_RMBG)
    )
    assert without.info().compile is None  # RMBG_COMPILE off: nothing to say


def test_an_artifact_directory_without_rmbg_compile_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        {"DEVICE": "cpu", "RMBG_MODEL": standins.PRODUCT_RMBG, "RMBG_INPUT_SIZE": str(SIZE)},
        rmbg_compile_cache=str(tmp_path),
    )
    with caplog.at_level("WARNING", logger="segmentation.factory"):
        segmentor = build_segmentor("rmbg", settings)
    assert segmentor.info().compile is None  # nothing compiles, nothing loaded
    assert [r.getMessage() for r in caplog.records if r.name == "segmentation.factory"] == [
        f"RMBG_COMPILE_CACHE is set but RMBG_COMPILE is not: nothing compiles, the artifacts "
        f"in {tmp_path} are not used"
    ]


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_a_single_frame_runs_the_blocks_uncompiled_and_a_batch_compiled() -> None:
    """A batch of 1 would trace and compile a second graph of every block geometry (half of
    a replica's start-up with an artifact): it runs the eager body, with the same mattes.
    The published architecture (random weights): the stand-ins have no Swin blocks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled before for the same geometries: forgotten
    segmentor = published_rmbg(input_size=64, optimized=COMPILED)
    assert rmbg20_fast.COMPILE in segmentor.fast_steps
    frames = [synthetic.scene(7300 + i, 0, 96, 64).image for i in range(2)]
    traced = counters["frames"]["ok"]  # process-wide: what ran before in this process too
    single = segmentor.predict(frames[:1])[0]
    assert counters["frames"]["ok"] == traced  # nothing traced
    pair = segmentor.predict(frames)
    assert counters["frames"]["ok"] > traced  # the batch of 2 ran compiled graphs
    assert np.abs(single.astype(int) - pair[0].astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--batch-sizes", "1"],
            "--batch-sizes 1 compiles nothing (a single frame runs the blocks uncompiled)",
        ),
        (["--max-batch-size", "1"], "--max-batch-size 1 compiles nothing"),
        (
            ["--batch-sizes", "4,8", "--ahead-of-time"],
            "--ahead-of-time records the blocks at a batch of 2: include 2 in --batch-sizes",
        ),
        (["--batch-sizes", "2,32"], "--batch-sizes [2, 32]: each from 1 to --max-batch-size"),
        (["--batch-sizes", "0,2"], "--batch-sizes [0, 2]: each from 1 to --max-batch-size"),
        (["--batch-sizes", "2,,4"], "--batch-sizes '2,,4': comma-separated integers"),
    ],
)
def test_the_builder_refuses_batch_sizes_that_build_nothing_before_loading_a_model(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    message: str,
) -> None:
    """Sizes that compile nothing, or no batch the programs are recorded at, are a usage
    error at once (no model loaded, no artifact written), not a traceback after the build."""
    monkeypatch.setenv("RMBG_MODEL", str(tmp_path / "no-model-here"))
    with pytest.raises(SystemExit) as refused:
        compile_cache.main([str(tmp_path / "artifacts"), *options])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


#: A replica's start from an artifact directory (the settings in the environment), batch
#: buckets up to 4: batches of 3 (padded to 4: the compiled decoder), 2 and 1 (eager); the
#: compile report and the mattes' gap.
REPLICA = """
import json
import numpy as np
from segmentation.batching import batch_buckets
from segmentation.config import load_settings
from segmentation.factory import build_segmentor
from segmentation_standins import synthetic

segmentor = build_segmentor("rmbg", load_settings(), load_format="dummy")
segmentor.batch_buckets = batch_buckets(4)
frames = [synthetic.scene(7400 + i, 0, 96, 64).image for i in range(3)]
triple, pair = segmentor.predict(frames), segmentor.predict(frames[:2])
single = segmentor.predict(frames[:1])[0]
gap = max(int(np.abs(m[0].astype(int) - single.astype(int)).max()) for m in (pair, triple))
print(json.dumps({"compile": segmentor.info().compile, "path": segmentor.inference_path,
                  "gap": gap, "std": float(single.std())}))
"""


@pytest.mark.skipif(
    not (RMBG_ARCH_DIR / "birefnet.py").exists(), reason="published RMBG-2.0 code absent"
)
def test_the_compiled_decoder_is_built_into_an_artifact_and_a_fresh_replica_compiles_nothing(
    tmp_path: Path,
) -> None:
    """``RMBG_COMPILE=decoder``: the builder compiles the published decoder (random weights,
    128 pixels) for the largest batch into the artifact; a fresh process with its own empty
    Inductor cache and the same batch sizes finds its graph there, compiles nothing, and its
    mattes match the eager decoder's (a single frame)."""
    env = {
        "DEVICE": "cpu",
        "RMBG_MODEL": str(RMBG_ARCH_DIR),
        "RMBG_TRUST_REMOTE_CODE": "true",
        "RMBG_INPUT_SIZE": str(SIZE),
        "RMBG_COMPILE": "decoder",
    }
    artifacts = tmp_path / "artifacts"
    builder = ["-m", "segmentation.compile_cache", str(artifacts), "--load-format", "dummy"]
    built = python_json([*builder, "--max-batch-size", "4"], tmp_path / "inductor-build", **env)
    assert Path(built["artifact"]).is_file() and built["bytes"] > 0
    replica = python_json(
        ["-c", REPLICA], tmp_path / "inductor-replica", **env, RMBG_COMPILE_CACHE=str(artifacts)
    )
    report = replica["compile"]
    assert report["key"] == built["key"]
    assert report["state"] == "artifact loaded: the decoder compiles from it"
    assert report["decoder"].startswith("compiled for batches of 4 (the largest batch size)")
    assert report["inductor_cache"]["misses"] == 0 and report["inductor_cache"]["hits"] >= 1
    assert replica["path"] == "sdpa+windows+decoder+deform+resample+fuse+compile-decoder"
    assert replica["std"] > 0 and replica["gap"] <= 1


def test_the_builder_refuses_a_decoder_artifact_without_the_largest_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder compiles for the replicas' largest batch only: sizes without it would
    build an artifact that lacks it (or nothing), so they are refused before any load."""
    monkeypatch.setenv("RMBG_MODEL", str(tmp_path / "no-model-here"))
    monkeypatch.setenv("RMBG_COMPILE", "decoder")
    with pytest.raises(SystemExit) as refused:
        compile_cache.main([str(tmp_path / "artifacts"), "--batch-sizes", "1,2,4"])
    assert refused.value.code == 2
    assert (
        "--batch-sizes [1, 2, 4]: the decoder compiles for --max-batch-size (16), the "
        "replicas' largest batch: include it"
    ) in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


def test_the_builder_refuses_ahead_of_time_programs_without_the_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The programs compiled ahead of time are the Swin blocks': with only the decoder to
    compile there is nothing to put in them, said before any load."""
    monkeypatch.setenv("RMBG_MODEL", str(tmp_path / "no-model-here"))
    monkeypatch.setenv("RMBG_COMPILE", "decoder")
    with pytest.raises(SystemExit) as refused:
        compile_cache.main([str(tmp_path / "artifacts"), "--ahead-of-time"])
    assert refused.value.code == 2
    assert (
        "--ahead-of-time compiles the Swin blocks: RMBG_COMPILE must include blocks"
    ) in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()
