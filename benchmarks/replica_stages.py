"""Where a segmentor replica's time went during a measured window, per frame.

Each replica reports in ``/v1/models`` its stage totals since it started (``stages``: count and
mean milliseconds per batch of ``model``, ``model:preprocess``, ``model:forward``,
``model:postprocess``, ...) and its frames by outcome. The difference of two snapshots, one
before and one after a load run, gives the time per frame of a stage during that run alone:
for YOLO, ``model:postprocess`` is NMS, mask decoding and RLE encoding, the part that grows
with the instances found.
"""

from __future__ import annotations

from typing import Any

import httpx

#: A replica of ``/v1/models``, by (model name, pid).
Snapshot = dict[tuple[str, int], dict[str, Any]]


def model_kind(name: str) -> str:
    """``rmbg`` or ``yolo`` for a model name of ``/v1/models``."""
    return "yolo" if "yolo" in name.lower() else "rmbg"


def snapshot(url: str, samples: int = 20) -> Snapshot:
    """Every segmentor replica ``/v1/models`` shows in ``samples`` calls (each call reaches one
    replica per deployment, chosen at random): frames answered and total ms per stage."""
    seen: Snapshot = {}
    for _ in range(samples):
        for model in httpx.get(f"{url}/v1/models", timeout=60).json()["models"]:
            seen[(model["name"], model["pid"])] = {
                "model": model["name"],
                "frames_ok": (model.get("frames") or {}).get("ok", 0),
                "inference_path": model.get("inference_path"),
                "precision": model.get("precision"),
                "startup_s": model.get("startup_s"),
                "compile": model.get("compile"),
                "stages": model.get("stages") or {},
            }
    return seen


def _total_ms(replica: dict[str, Any], stage: str) -> float:
    timing = (replica.get("stages") or {}).get(stage)
    return float(timing["count"] * timing["mean_ms"]) if timing else 0.0


def per_frame_ms(
    before: Snapshot, after: Snapshot, kind: str, stage: str = "model:postprocess"
) -> float | None:
    """Milliseconds of ``stage`` per frame answered by ``kind``'s replicas between the two
    snapshots; None when they answered no frame (or report no such stage). A replica entry
    needs ``model``, ``frames_ok`` and ``stages`` as :func:`snapshot` gives them."""
    frames = 0
    total_ms = 0.0
    for key, now in after.items():
        if model_kind(now["model"]) != kind or stage not in (now.get("stages") or {}):
            continue
        then = before.get(key, {"frames_ok": 0})
        frames += now["frames_ok"] - then["frames_ok"]
        total_ms += _total_ms(now, stage) - _total_ms(then, stage)
    return round(total_ms / frames, 3) if frames > 0 else None
