"""Custom Ray Serve metrics, exported on Ray's metrics endpoint (prefix ``ray_``).

Each replica creates one :class:`SegmentorMetrics`; tags carry the model name so RMBG and YOLO
series stay apart. PromQL examples are in docs/operations.md.
"""

from __future__ import annotations

import threading

from ray.serve import metrics

_LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
_BATCH = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128]

#: Outcome tags of ``segmentor_frames_total``: a result; the frame's own fault (4xx); no GPU
#: memory for it alone; its deadline passed in the queue; a server fault; the queue was full;
#: its caller went away before the answer (taken out of the queue, or its result dropped).
OUTCOMES = ("ok", "bad_input", "oom", "deadline", "error", "overloaded", "cancelled")


class StageTotals:
    """Running count and total time per stage, for ``/v1/models`` (where time goes).

    Keys come from code (stages, model steps, route templates, codec functions), but nothing
    stops a new caller from passing one per request: at most ``max_keys`` are kept, and time
    under any further key is added to :data:`OTHER`, so memory and the ``/v1/models`` answer
    stay bounded and the totals still add up.
    """

    OTHER = "other"

    def __init__(self, max_keys: int = 64) -> None:
        if max_keys < 2:
            raise ValueError(f"max_keys must be at least 2 (one key and '{self.OTHER}')")
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._totals: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            entry = self._totals.get(stage)
            if entry is None:
                # The last free slot is kept for OTHER: never more than max_keys entries.
                if len(self._totals) >= self.max_keys - (self.OTHER not in self._totals):
                    stage = self.OTHER
                entry = self._totals.setdefault(stage, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                stage: {"count": int(n), "mean_ms": round(total * 1000 / max(n, 1), 2)}
                for stage, (n, total) in self._totals.items()
            }


class SegmentorMetrics:
    def __init__(self, model: str) -> None:
        self.totals = StageTotals()
        tags = ("model",)
        self._tags = {"model": model}
        self.frames = metrics.Counter(
            "segmentor_frames_total",
            "Frames answered, by outcome: " + ", ".join(OUTCOMES) + ".",
            tag_keys=(*tags, "outcome"),
        )
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._outcomes_lock = threading.Lock()
        self.batch_size = metrics.Histogram(
            "segmentor_batch_size", "Frames per model call.", boundaries=_BATCH, tag_keys=tags
        )
        self.stage_ms = metrics.Histogram(
            "segmentor_stage_latency_ms",
            "Latency of one stage (decode, queue, model, encode) in milliseconds.",
            boundaries=_LATENCY_MS,
            tag_keys=(*tags, "stage"),
        )
        self.gpu_memory = metrics.Gauge(
            "segmentor_gpu_memory_bytes",
            "GPU memory of this replica's process (allocated, reserved, peak).",
            tag_keys=(*tags, "kind"),
        )
        self.batch_cap = metrics.Gauge(
            "segmentor_batch_cap", "Live batch cap (drops after an OOM).", tag_keys=tags
        )
        self.oom_splits = metrics.Counter(
            "segmentor_oom_splits_total", "Batches split after a GPU OOM.", tag_keys=tags
        )
        self.fp32_fallbacks = metrics.Counter(
            "segmentor_fp32_fallbacks_total",
            "Frames recomputed in FP32 because FP16 gave non-finite values.",
            tag_keys=tags,
        )
        self.rejected = metrics.Counter(
            "segmentor_rejected_total", "Requests rejected, by reason.", tag_keys=(*tags, "reason")
        )
        for metric in (
            self.frames,
            self.batch_size,
            self.stage_ms,
            self.gpu_memory,
            self.batch_cap,
            self.oom_splits,
            self.fp32_fallbacks,
            self.rejected,
        ):
            metric.set_default_tags(dict(self._tags))  # Serve adds its tags to the dict it gets

    def stage(self, stage: str, seconds: float) -> None:
        self.stage_ms.observe(seconds * 1000.0, tags={"stage": stage})
        self.totals.add(stage, seconds)

    def answered(self, outcome: str, count: int = 1) -> None:
        """``count`` frames answered with ``outcome`` (one of :data:`OUTCOMES`)."""
        if count <= 0:
            return
        with self._outcomes_lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + count
        self.frames.inc(count, tags={"outcome": outcome})

    def outcomes(self) -> dict[str, int]:
        """Frames answered by this replica so far, by outcome (for ``/v1/models``)."""
        with self._outcomes_lock:
            return dict(self._outcomes)

    def reject(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})

    def memory(self, stats: dict[str, int]) -> None:
        for kind, value in stats.items():
            self.gpu_memory.set(float(value), tags={"kind": kind.removesuffix("_bytes")})
