"""What this process was given to run on (no torch: the router imports it)."""

from __future__ import annotations

import ctypes
import ctypes.util
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


#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc refuses an mmap threshold above this on 64-bit hosts (``HEAP_MAX_SIZE / 2``).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def keep_heap(mib: int) -> bool:
    """Let this process reuse its heap for large buffers instead of mapping and unmapping
    fresh pages for each: buffers below ``mib`` (at most 32 MiB) come from the heap, and up
    to ``mib`` of freed memory stays in it, reused by the next request rather than handed
    back to the kernel and faulted in again. A frame request's bodies, pickled calls and
    decoded frames are megabytes each; glibc's defaults unmapped them after every request
    (a 16-frame call of 1080p JPEGs took 3 ms to pickle, 0.5 ms with its heap kept:
    docs/benchmarks.md). 0 leaves glibc's defaults. False where the C library has no
    ``mallopt`` (not glibc) or refuses the values."""
    if mib <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    size = mib * 1024 * 1024
    # Both are set: setting either one turns off glibc's adjustment of the other.
    return bool(mallopt(M_MMAP_THRESHOLD, min(size, MAX_MMAP_THRESHOLD))) and bool(
        mallopt(M_TRIM_THRESHOLD, size)
    )
