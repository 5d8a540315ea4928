"""CUDA-graph replay of a model's forward at fixed input shapes.

A small model such as YOLO11n-seg runs ~300 kernels in ~12 ms of GPU time at batch 64: its
speed is the speed of the Python thread launching them. In a serving process that thread
shares the interpreter lock with the request handling, and every op's launch waits for it
again (measured on an H100: 372 ms per batch of 64 in the replica against 12 ms alone). A
captured graph is one launch per batch, whatever the interpreter is doing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]


class GraphedForward:
    """``select(module(x))`` replayed from CUDA graphs captured per input shape.

    Graphs share one memory pool (they never run at the same time: one GPU thread runs the
    model), and outputs are copied out after each replay, so the next replay cannot overwrite
    them. An input whose shape or dtype has no graph runs eagerly.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        select: Callable[[object], Outputs],
        device: torch.device,
        keep: Callable[[], object] | None = None,
        before_capture: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """``keep`` returns state the module cached during a capture (e.g. anchor tensors)
        that the graph reads: it is held with the graph so its memory is never reused.
        ``before_capture(example)`` runs before each capture (e.g. to tell a module that
        caches per-shape state that what the warm-up left is valid for this shape)."""
        self.module = module
        self.select = select
        self.device = device
        self.keep = keep
        self.before_capture = before_capture
        self._graphs: dict[
            tuple[tuple[int, ...], torch.dtype], tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]
        ] = {}
        self._kept: list[object] = []
        self._pool: Any = None

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return sorted(shape for shape, _ in self._graphs)

    @property
    def batch_sizes(self) -> list[int]:
        return [shape[0] for shape in self.shapes]

    def capture(self, examples: Sequence[torch.Tensor]) -> None:
        """Capture one graph per example's shape, largest first (they size the shared pool).

        Every shape is warmed up before the first capture: a warm-up run after a capture
        would need a second set of activations beside the pool's (a replica with half a card
        cannot hold RMBG-2.0's batch-16 activations twice), and the smaller graphs then
        capture inside the blocks the largest one left in the shared pool.
        """
        ordered = sorted(examples, key=lambda t: t.numel(), reverse=True)
        statics = [example.clone() for example in ordered]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for static_in in statics:
                for _ in range(2):  # lazy initialisation must happen outside the capture
                    self.select(self.module(static_in))
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Release what those runs cached: the graphs' pool needs the same memory again.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        for static_in in statics:
            if self.before_capture is not None:
                self.before_capture(static_in)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.select(self.module(static_in))
            self._pool = graph.pool()
            self._graphs[(tuple(static_in.shape), static_in.dtype)] = (graph, static_in, static_out)
            if self.keep is not None:
                self._kept.append(self.keep())

    def __call__(self, batch: torch.Tensor) -> Outputs:
        entry = self._graphs.get((tuple(batch.shape), batch.dtype))
        if entry is None:
            return self.select(self.module(batch))
        graph, static_in, static_out = entry
        static_in.copy_(batch)
        graph.replay()
        return tuple(t.clone() for t in static_out)


def try_capture(
    name: str,
    module: torch.nn.Module,
    select: Callable[[object], Outputs],
    examples: Sequence[torch.Tensor],
    keep: Callable[[], object] | None = None,
    before_capture: Callable[[torch.Tensor], None] | None = None,
) -> tuple[GraphedForward | None, str | None]:
    """Graphs of ``module`` for each example's shape, or None and why they could not be
    captured (e.g. out of memory: the caller then runs eagerly, as before)."""
    device = examples[0].device
    graphs = GraphedForward(module, select, device, keep=keep, before_capture=before_capture)
    error = None
    try:
        with torch.inference_mode():
            graphs.capture(examples)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    if error is not None:
        del graphs  # its graphs and their memory pool go with it
        torch.cuda.empty_cache()
        logger.warning("CUDA graphs unavailable for %s (%s); running eagerly", name, error)
        return None, error
    logger.info(
        "%s: CUDA graphs captured for batch sizes %s at %s",
        name,
        graphs.batch_sizes,
        "x".join(map(str, examples[0].shape[1:])),
    )
    return graphs, None
