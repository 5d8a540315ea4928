"""The process resources a router or replica sets up for itself: its heap for large buffers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from segmentation_service.config import RouterArgs, SegmentorArgs
from segmentation_service.resources import keep_heap
from tests.conftest import REPO_ROOT

#: A fresh process: glibc's heap statistics (mallinfo2) around an 8 MiB buffer, with the
#: heap kept (argv[1] MiB) or not (0).
HEAP = """
import ctypes, json, sys
from segmentation_service.resources import keep_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_heap(int(sys.argv[1]))
before = libc.mallinfo2()
buffer = bytearray(8 << 20)
during = libc.mallinfo2()
del buffer
after = libc.mallinfo2()
print(json.dumps({
    "kept": kept,
    "mapped_for_it": during.hblkhd - before.hblkhd,
    "heap_grew": during.arena - before.arena,
    "free_in_heap_after": after.fordblks,
}))
"""


def _heap(mib: int) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", HEAP, str(mib)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    if "mallinfo2" in done.stderr:
        pytest.skip("the C library is not glibc 2.33 or later (no mallinfo2)")
    assert done.returncode == 0, done.stderr[-2000:]
    report: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_a_kept_heap_serves_a_large_buffer_and_keeps_it_for_the_next() -> None:
    kept = _heap(64)
    assert kept["kept"] is True
    assert kept["mapped_for_it"] == 0  # from the heap, not a fresh mapping
    assert kept["heap_grew"] >= 8 << 20
    assert kept["free_in_heap_after"] >= 8 << 20  # freed, and still there for reuse


def test_without_it_glibc_maps_the_buffer_and_unmaps_it_when_freed() -> None:
    default = _heap(0)
    assert default["kept"] is False
    assert default["mapped_for_it"] >= 8 << 20
    assert default["free_in_heap_after"] < 8 << 20


def test_the_router_and_the_segmentors_keep_256_mib_unless_told_otherwise() -> None:
    assert RouterArgs().heap_keep_mib == SegmentorArgs().heap_keep_mib == 256
    assert RouterArgs(heap_keep_mib=0).heap_keep_mib == 0
    with pytest.raises(ValueError, match="less than or equal to 1024"):
        SegmentorArgs(heap_keep_mib=4096)
    assert keep_heap(0) is False
