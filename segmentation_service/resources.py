"""What this process was given to run on (no torch: the router imports it)."""

from __future__ import annotations

import os


def codec_threads() -> int:
    """Threads for image codecs: the CPUs Ray assigned to this process (``num_cpus``), at
    least 2; outside Ray, the CPUs this process may run on. Not the node's core count: on a
    64-core node every replica and router would each start 64 threads."""
    try:
        import ray

        if ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            if assigned:
                return max(2, round(assigned))
    except Exception:  # outside a Ray worker
        pass
    return max(2, len(os.sched_getaffinity(0)))
