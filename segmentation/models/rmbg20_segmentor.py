"""RMBG-2.0 background removal: uint8 RGB frames in, uint8 alpha mattes out."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F

from segmentation import compile_cache, quantize
from segmentation.batching import pad_to_bucket
from segmentation.compose import Composed, OnDevice, compose_on_device, plain_cutout
from segmentation.config import DEFAULT_RMBG_MODEL, LinearFormat
from segmentation.models import rmbg20_blocks, rmbg20_fast
from segmentation.models.base import (
    Frame,
    ModelInfo,
    StageClock,
    frame_size,
    host_batch,
    weights_sha256,
)
from segmentation.models.rmbg20_loader import build_model, cast_attention_masks, resolve_model_dir
from segmentation.options import CutoutOptions
from segmentation.precision import Precision, apply_precision, choose_precision, resolve_device
from segmentation.transfer import Arrival, HostCopy, copy_to_host
from segmentation_standins import describe as describe_standin

logger = logging.getLogger(__name__)

FP16_MESSAGE = "Model converted to FP16 precision for memory efficiency"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LoadFormat = Literal["auto", "dummy"]
#: With a ``compile_cache``: ``use`` an artifact that is there (compile nothing without one);
#: ``build`` one (compile whatever is there; :mod:`segmentation.compile_cache` saves it).
CompileArtifacts = Literal["use", "build"]


class RMBG20Segmentor:
    """BRIA RMBG-2.0 (BiRefNet) with batched GPU pre/post-processing and pure FP16.

    Args:
        model_path: hub repo id (with a pinned ``revision``), a local model directory, or a
            stand-in name from :mod:`segmentation_standins`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        use_fp16: run in FP16 where the GPU supports it; FP32 elsewhere.
        load_format: ``auto`` loads the weights; ``dummy`` keeps random weights (benchmarks).
        input_size: the square size the model runs at (1024 for RMBG-2.0).
        optimized: the fast inference path of :mod:`segmentation.models.rmbg20_fast`
            (``True``: its default steps; a sequence names the steps; ``False``: the published
            eager code, the reference). ``info().inference_path`` says what runs.
        linear_format: ``fp8`` or ``int8`` keeps the transformer linear layers in that format
            (:mod:`segmentation.quantize`; ``USE_FP8``, ``USE_INT8``); the precision's name
            then says so (``fp16+int8-linear``). FP8 on a device that cannot run it, or
            either without torchao, is refused here, before any weight is loaded.
        compile_cache: a directory of compiled artifacts (``RMBG_COMPILE_CACHE``,
            :mod:`segmentation.compile_cache`) for the compile steps (``compile``,
            ``compile-decoder``): its artifact is loaded before anything compiles; without
            one those steps are left out (see
            ``compile_artifacts``). ``info().compile`` says which happened.
        compile_artifacts: ``use`` (the service) or ``build`` (the tool that makes them).
    """

    name = "rmbg-2.0"

    def __init__(
        self,
        model_path: str = DEFAULT_RMBG_MODEL,
        device: str | torch.device = "auto",
        use_fp16: bool = True,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        token: str | None = None,
        load_format: LoadFormat = "auto",
        input_size: int = 1024,
        optimized: bool | Sequence[str] = True,
        linear_format: LinearFormat | None = None,
        compile_cache: str | Path | None = None,
        compile_artifacts: CompileArtifacts = "use",
    ) -> None:
        import segmentation_standins as standins

        self.device = resolve_device(device)
        if linear_format is not None:
            quantize.check_supported(linear_format, self.device)
        steps = tuple(rmbg20_fast.DEFAULT_STEPS if optimized is True else (optimized or ()))
        self.source = model_path
        self.revision = revision
        self.input_size = input_size
        self.stand_in = standins.is_standin(model_path)
        if self.stand_in:
            model_dir = standins.materialize(model_path)
        else:
            model_dir = resolve_model_dir(
                model_path,
                revision=revision,
                trust_remote_code=trust_remote_code,
                token=token,
                need_weights=load_format != "dummy",
            )
        #: Seconds of each loading step (``build_model``'s, then ``prepare``: precision and
        #: the fast path), for start-up profiles.
        self.load_seconds: dict[str, float] = {}
        model = build_model(
            Path(model_dir),
            load_weights=load_format != "dummy",
            device=self.device,
            timings=self.load_seconds,
        )
        clock = StageClock(self.device, self.load_seconds)  # waits for the GPU at its lap
        self.precision: Precision = apply_precision(
            model,
            choose_precision(self.device, use_fp16),
            success_message=FP16_MESSAGE,
            prepare=cast_attention_masks,
        )
        self.model = model.to(self.device)
        if linear_format is not None:
            done = quantize.quantize_linears(self.model, linear_format, self.device)
            self.precision = self.precision.with_linear(linear_format, done.describe())
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the FP32 tensors the build and the conversion left
        #: The compile steps' state for ``/v1/models`` (None: none was asked for).
        self.compile_status: dict[str, Any] | None = None
        #: Inductor's cache counts when an artifact was loaded (None: none was).
        self._inductor_before: dict[str, int] | None = None
        #: The Swin blocks' ahead-of-time programs, when their packages were loaded.
        self._programs: rmbg20_blocks.BlockPrograms | None = None
        if rmbg20_fast.COMPILED_STEPS.keys() & set(steps):
            steps, self.compile_status = self._compiled_artifact(
                steps,
                compile_cache,
                compile_artifacts,
                Path(model_dir),
                load_format,
                linear_format,
            )
        #: Steps of the fast path applied to this model (empty: the published eager code).
        self.fast_steps: tuple[str, ...] = rmbg20_fast.optimize(self.model, steps)
        if self._programs is not None:
            if rmbg20_blocks.install(self.model, self._programs):
                applied = {*self.fast_steps, rmbg20_fast.COMPILE}
                self.fast_steps = tuple(s for s in rmbg20_fast.ALL_STEPS if s in applied)
            else:
                self._programs = None  # loaded, but no block takes them: nothing ran
        if (
            self.compile_status is not None
            and (rmbg20_fast.COMPILE in steps or self._programs is not None)
            and rmbg20_fast.COMPILE not in self.fast_steps
        ):
            self.compile_status["state"] = (
                "not compiled: the model has no Swin blocks the fast path recognises"
            )
        clock.lap("prepare")
        # One forward at a time, the FP32 recompute included: see _recompute_non_finite.
        self._model_lock = threading.Lock()
        #: Frames whose FP16 output had non-finite values and were recomputed in FP32.
        self.fp32_recomputed = 0
        self._batch_buckets: tuple[int, ...] | None = None
        self._graphs: Any = None  # GraphedForward, once capture_graphs succeeded
        #: Why the last capture failed (None: it did not, or none was tried).
        self.graph_error: str | None = None
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def batch_buckets(self) -> tuple[int, ...] | None:
        """Batch sizes the model runs at (see :func:`segmentation.batching.batch_buckets`);
        None runs every batch at its own size. A compiled decoder (``compile-decoder``)
        compiles for the largest (None: for each size it meets)."""
        return self._batch_buckets

    @batch_buckets.setter
    def batch_buckets(self, buckets: tuple[int, ...] | None) -> None:
        self._batch_buckets = buckets
        rmbg20_fast.compile_decoder_for(self.model, (max(buckets),) if buckets else None)

    def _compiled_artifact(
        self,
        steps: tuple[str, ...],
        directory: str | Path | None,
        mode: CompileArtifacts,
        model_dir: Path,
        load_format: LoadFormat,
        linear_format: LinearFormat | None,
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The steps to apply and the compile state: the artifact of this model, device and
        code loaded (the compiled parts, blocks and/or decoder, compile from it), or, where it
        is missing or unreadable, the steps without the compile steps."""
        if directory is None:
            return steps, {"state": "compiled at start-up (no RMBG_COMPILE_CACHE)"}
        parts = compile_cache.key_parts(
            model_code=compile_cache.model_files(model_dir),
            fast_path_code=compile_cache.project_code(),
            # hashed only here: without an artifact directory nothing needs the weights read
            weights_sha256=None if load_format == "dummy" else weights_sha256(model_dir),
            device=self.device,
            dtype=self.precision.dtype,
            input_size=self.input_size,
            steps=steps,
            linear_format=linear_format,
        )
        key = compile_cache.artifact_key(parts)
        path = compile_cache.artifact_path(directory, key)
        programs = compile_cache.artifact_path(directory, key, ahead=True)
        status: dict[str, Any] = {"key": key, "artifact": str(path)}
        if mode == "build":
            return steps, {**status, "state": "building the artifact"}
        # Programs compiled ahead of time first (no tracing at start-up; the compile step is
        # then installed after the others, not applied by torch.compile), where the blocks
        # compile, the linear layers are plain and the directory is there; then Inductor's
        # caches for what is left to compile.
        ahead = rmbg20_fast.COMPILE in steps and compile_cache.ahead_of_time(linear_format)
        if ahead and programs.is_dir():
            try:
                self._programs = rmbg20_blocks.load_programs(programs, self.device)
            except Exception as exc:  # unreadable, foreign, or a loader that crashes
                status["programs"] = f"not used: {type(exc).__name__}: {exc}"[:600]
                logger.warning("RMBG-2.0 compiled blocks: %s", status["programs"])
            else:
                status["programs"] = self._programs.describe()
                # the programs replace the blocks' compiled body, and like it the kernels
                dropped = (rmbg20_fast.COMPILE, rmbg20_fast.FUSE, rmbg20_fast.ATTN)
                steps = tuple(step for step in steps if step not in dropped)
                if rmbg20_fast.COMPILE_DECODER not in steps:
                    state = "artifact loaded: blocks compiled ahead of time"
                    return steps, {**status, "artifact": str(programs), "state": state}
        compiled = " and ".join(
            part for step, part in rmbg20_fast.COMPILED_STEPS.items() if step in steps
        )
        try:
            found = path.is_file()
            if found:
                self._inductor_before = compile_cache.inductor_counts()
                status["bytes"] = compile_cache.load_artifact(path)
        except Exception as exc:  # unreadable, truncated or foreign: start, uncompiled
            reason = f"artifact unreadable ({type(exc).__name__}: {exc})"
        else:
            if found:
                verb = "compiles" if compiled == "decoder" else "compile"
                state = f"artifact loaded: the {compiled} {verb} from it"
                return steps, {**status, "state": state}
            reason = "no artifact for this model, device and code"
        without = tuple(step for step in steps if step not in rmbg20_fast.COMPILED_STEPS)
        if self._programs:  # the blocks' programs loaded: only the decoder is left out
            head, rest = "decoder not compiled", "blocks compiled ahead of time, the rest"
        else:
            head, rest = "not compiled", "the fast path"
        message = (
            f"{head}: {reason}; {rest} runs uncompiled. Build it with "
            f"`{compile_cache.build_command(directory)}` on a machine like this one "
            "(same GPU and software, the replicas' settings)"
        )
        logger.warning("RMBG-2.0 compiled %s: %s (%s)", compiled, message, path)
        return without, {**status, "state": message}

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            source=self.source,
            revision=self.revision,
            precision=self.precision.name,
            precision_reason=self.precision.reason,
            device=str(self.device),
            stand_in=self.stand_in,
            stand_in_weights=describe_standin(self.source),
            inference_path=self.inference_path,
            compile=self.compile_report(),
        )

    def compile_report(self) -> dict[str, Any] | None:
        """``compile_status``; the batch sizes the compiled decoder runs at (``decoder``); once
        an artifact was loaded, Inductor's FX-graph cache hits and misses since (a miss is a
        graph the artifact lacked, compiled here); once the blocks' programs were loaded, the
        block calls since (``program``; ``batch`` and ``geometry``: the eager body, for a
        batch size or a geometry the programs do not take)."""
        if self.compile_status is None:
            return None
        report = dict(self.compile_status)
        if rmbg20_fast.COMPILE_DECODER in self.fast_steps:
            report["decoder"] = (
                f"compiled for batches of {max(self._batch_buckets)} (the largest batch "
                "size); smaller batches run it uncompiled"
                if self._batch_buckets
                else "compiled for each batch size from 2 (no batch sizes set)"
            )
        if self._programs is not None:
            report["block_calls"] = dict(self._programs.calls)
        if self._inductor_before is not None:
            now = compile_cache.inductor_counts()
            report["inductor_cache"] = {k: now[k] - self._inductor_before[k] for k in now}
        return report

    @property
    def inference_path(self) -> str:
        """``eager``, or the fast-path steps and ``graphs`` joined by ``+`` (``/v1/models``)."""
        return rmbg20_fast.path_name(self.fast_steps, self._graphs is not None)

    @torch.inference_mode()
    def predict(
        self,
        frames: Sequence[Frame],
        timings: dict[str, float] | None = None,
        *,
        cutouts: bool | Sequence[bool] = False,
    ) -> list[np.ndarray]:
        """Alpha mattes (uint8 ``HxW``, each at its frame's own size) of uint8 RGB frames:
        ``HxWx3`` arrays, or ``3xHxW`` tensors already on the device (decoded by nvJPEG).

        ``cutouts`` (one flag, or one per frame): answer that frame's RGBA cutout ``HxWx4``
        instead, composed on the device where its pixels already are: the frame's pixels
        where the matte is not 0, ``(0, 0, 0, 0)`` where it is (as ``wire.cutout_rgba``).
        ``timings``, when given, receives the seconds spent in each step (``preprocess``,
        ``forward``, ``postprocess``, and ``copy``: the wait for the outputs' copy to the host).
        """
        wanted = [cutouts] * len(frames) if isinstance(cutouts, bool) else list(cutouts)
        if len(wanted) != len(frames):
            raise ValueError(f"{len(wanted)} cutout flags for {len(frames)} frames")
        plain = CutoutOptions()
        outputs = self.predict_outputs(frames, [plain if w else None for w in wanted], timings)
        return [out.pixels if isinstance(out, Composed) else out for out in outputs]

    @torch.inference_mode()
    def predict_outputs(
        self,
        frames: Sequence[Frame],
        options: Sequence[CutoutOptions | None],
        timings: dict[str, float] | None = None,
    ) -> list[np.ndarray | Composed]:
        """Per frame, what its ``options`` ask for (:func:`segmentation.compose.compose`:
        cutout or matte, cropped, scaled, edge colours refined, on a background), composed
        on the device; the plain matte (uint8 ``HxW``) where they are None or ``raw``."""
        arriving = self.predict_outputs_later(frames, options, timings)
        clock = StageClock(self.device, timings)
        outputs = arriving.result()
        clock.lap("copy")
        return outputs

    @torch.inference_mode()
    def predict_outputs_later(
        self,
        frames: Sequence[Frame],
        options: Sequence[CutoutOptions | None],
        timings: dict[str, float] | None = None,
    ) -> Arrival[np.ndarray | Composed]:
        """:meth:`predict_outputs` without waiting for the outputs' copy to the host: it runs
        on the device's copy engine (:func:`segmentation.transfer.copy_to_host`) while the
        caller goes on to the next batch, and the result's ``result()`` (or each frame's)
        waits for it."""
        if len(options) != len(frames):
            raise ValueError(f"{len(options)} options for {len(frames)} frames")
        if not frames:
            return Arrival(HostCopy([]), lambda hosts: [], 0)
        clock = StageClock(self.device, timings)
        pixels = _upload_grouped(frames, self.device)
        batch = self._normalised(pixels)
        clock.lap("preprocess")
        with self._model_lock:
            logits = self.forward(batch)
            if logits.dtype == torch.float16:
                logits = self._recompute_non_finite(batch, logits)
            clock.lap("forward")
        composed = [o if o is not None and o.output != "raw" else None for o in options]
        rgb = [frame for group in pixels for frame in group] if any(composed) else None
        outputs = self._postprocess_later(
            logits,
            [frame_size(frame) for frame in frames],
            [rgb[i] if rgb is not None and composed[i] else None for i in range(len(frames))],
            composed,
        )
        clock.lap("postprocess")
        return outputs

    def _recompute_non_finite(self, batch: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Recompute in FP32 the frames whose FP16 logits overflowed (inf/NaN).

        The weights are cast up for the call, then the model gets its own FP16 tensors back
        (CUDA graphs captured on them stay valid). ``predict`` holds ``_model_lock`` around
        every forward and this swap, so a concurrent call can never run on half-swapped or
        FP32 weights. A lock rather than a lazily made FP32 copy of the model: the GPU runs one
        forward at a time anyway, so serialising forwards costs no throughput (decoding,
        resizing and encoding of other calls still overlap), while an FP32 copy would hold
        0.82 GiB more per replica for a rare event. Call with ``_model_lock`` held.
        """
        bad = ~torch.isfinite(logits).flatten(1).all(dim=1)
        if not bool(bad.any()):
            return logits
        count = int(bad.sum())
        logger.warning("FP16 output of %d frame(s) was not finite; recomputing in FP32", count)
        with _in_fp32(self.model):
            fixed = self.forward(batch[bad].float())  # FP32 input: never a (FP16) graph
        logits = logits.float()
        logits[bad] = fixed
        self.fp32_recomputed += count
        return logits

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Resize to ``input_size`` and normalise on the device: ``[B, 3, S, S]``, model dtype."""
        return self._normalised(_upload_grouped(frames, self.device))

    def _normalised(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        resized = [
            F.interpolate(
                group.float(), size=size, mode="bilinear", antialias=True, align_corners=False
            )
            for group in groups
        ]
        batch = torch.cat(resized) if len(resized) > 1 else resized[0]
        # One layout whatever the frames' sizes (frames already at the input size keep their
        # channels-last layout through the resize): a compiled graph specialises on it.
        return ((batch - self._mean) / self._std).to(self.dtype).contiguous()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits ``[B, 1, S, S]`` (the last of the model's four maps).

        With ``batch_buckets`` set, the batch runs padded to the next bucket size.
        """
        padded = pad_to_bucket(batch, self.batch_buckets)
        if self._graphs is not None:
            (logits,) = self._graphs(padded)
        else:
            (logits,) = _last_map(self.model(padded))
        return logits[: batch.shape[0]]

    def capture_graphs(self, batch_sizes: Sequence[int]) -> bool:
        """Capture CUDA graphs of the model at each batch size (inputs are always
        ``input_size`` square). False (and eager runs, as before) where that is not possible."""
        if self.device.type != "cuda":
            return False
        from segmentation.graphs import try_capture

        blocker = rmbg20_fast.graph_blocker(self.model)
        if blocker is not None:
            self.graph_error = blocker
            logger.warning("CUDA graphs unavailable for %s (%s)", self.source, blocker)
            return False
        size = self.input_size
        examples = [
            torch.zeros((n, 3, size, size), dtype=self.dtype, device=self.device)
            for n in batch_sizes
        ]
        graphs, self.graph_error = try_capture(self.source, self.model, _last_map, examples)
        if graphs is None:
            return False
        self._graphs = graphs
        return True

    @property
    def graph_batch_sizes(self) -> list[int]:
        """Batch sizes replayed from CUDA graphs (empty: every batch runs eagerly)."""
        return self._graphs.batch_sizes if self._graphs is not None else []

    @overload
    def postprocess(
        self,
        logits: torch.Tensor,
        sizes: Sequence[tuple[int, ...]],
        pixels: Sequence[torch.Tensor | None] | None = None,
    ) -> list[np.ndarray]: ...

    @overload
    def postprocess(
        self,
        logits: torch.Tensor,
        sizes: Sequence[tuple[int, ...]],
        pixels: Sequence[torch.Tensor | None] | None,
        options: Sequence[CutoutOptions | None],
    ) -> list[np.ndarray | Composed]: ...

    def postprocess(
        self,
        logits: torch.Tensor,
        sizes: Sequence[tuple[int, ...]],
        pixels: Sequence[torch.Tensor | None] | None = None,
        options: Sequence[CutoutOptions | None] | None = None,
    ) -> list[np.ndarray] | list[np.ndarray | Composed]:
        """Sigmoid, resize back to each frame's size, quantise to uint8 on the device; where
        ``pixels`` has the frame's ``3xHxW`` uint8 tensor, its composed output instead (the
        plain RGBA cutout, or what ``options`` of that frame ask for)."""
        return self._postprocess_later(logits, sizes, pixels, options).result()

    def _postprocess_later(
        self,
        logits: torch.Tensor,
        sizes: Sequence[tuple[int, ...]],
        pixels: Sequence[torch.Tensor | None] | None = None,
        options: Sequence[CutoutOptions | None] | None = None,
    ) -> Arrival[np.ndarray | Composed]:
        """:meth:`postprocess`, its outputs still on their way to the host."""
        probs = torch.sigmoid(logits.float())  # a new tensor: the caller's logits stay as they are
        made: list[torch.Tensor | OnDevice] = []
        for index, (height, width) in enumerate(sizes):
            alpha = F.interpolate(
                probs[index : index + 1],
                size=(int(height), int(width)),
                mode="bilinear",
                align_corners=False,
            )
            matte = alpha.mul_(255.0).round_().to(torch.uint8)[0, 0]
            rgb = pixels[index] if pixels is not None else None
            chosen = options[index] if options is not None else None
            if rgb is None:
                made.append(matte)
            elif chosen is None:
                made.append(plain_cutout(rgb, matte))
            else:
                made.append(compose_on_device(rgb, matte, chosen))
        # The batch's outputs cross to the host together: one pinned copy, one wait.
        parts = [m.tensors() if isinstance(m, OnDevice) else [m] for m in made]
        copy = copy_to_host([tensor for tensors in parts for tensor in tensors])

        def finish(hosts: list[np.ndarray]) -> list[np.ndarray | Composed]:
            arrays = iter(hosts)
            each = [[next(arrays) for _ in tensors] for tensors in parts]
            return [
                m.on_host(*host) if isinstance(m, OnDevice) else host[0]
                for m, host in zip(made, each, strict=True)
            ]

        return Arrival(copy, finish, len(made))


def _last_map(outputs: Any) -> tuple[torch.Tensor]:
    """The full-resolution logits: the last of BiRefNet's maps in eval mode."""
    return (outputs[-1] if isinstance(outputs, (list, tuple)) else outputs,)


@contextmanager
def _in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in FP32 inside the block, then with its own FP16 tensors again (the same
    storage, not a copy: graphs captured on it read that memory).

    Quantized weights (``USE_FP8``, ``USE_INT8``: torchao tensors) stay as they are: their
    layers answer in their input's dtype, and torchao has no cast of them under inference
    mode (``model.float()`` raised NotImplementedError for ``aten.to.dtype``)."""
    # Plain floating-point tensors only: restoring a quantized one (``param.data = ...``)
    # is not implemented by torchao either.
    params = [
        (param, param.data)
        for param in model.parameters()
        if type(param.data) is torch.Tensor and param.is_floating_point()
    ]
    buffers = [
        (module, name, buffer)
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and buffer.is_floating_point()
    ]
    for param, data in params:
        param.data = data.float()
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.float()
    try:
        yield
    finally:
        for param, data in params:
            param.data = data
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


def _upload_grouped(frames: Sequence[Frame], device: torch.device) -> list[torch.Tensor]:
    """Frames as uint8 ``[N, 3, H, W]`` tensors on ``device``, runs of same-size frames
    stacked; host arrays are copied once into a pinned batch, device tensors stay put."""
    groups: list[list[Frame]] = []
    for frame in frames:
        size = frame_size(frame)
        if groups and frame_size(groups[-1][0]) == size and _same_kind(groups[-1][0], frame):
            groups[-1].append(frame)
        else:
            groups.append([frame])
    pin = device.type == "cuda"
    uploaded = []
    for group in groups:
        if isinstance(group[0], torch.Tensor):
            uploaded.append(torch.stack([t.to(device) for t in group]))  # type: ignore[union-attr]
        else:
            arrays = [f for f in group if isinstance(f, np.ndarray)]
            host = host_batch(arrays, pin).to(device, non_blocking=pin)
            uploaded.append(host.permute(0, 3, 1, 2))
    return uploaded


def _same_kind(a: Frame, b: Frame) -> bool:
    return isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor)
