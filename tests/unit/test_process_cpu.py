"""The benchmarks' CPU accounting by process kind, from two samples of per-process times."""

from __future__ import annotations

from benchmarks import process_cpu


def test_cores_of_the_busiest_process_of_each_kind_over_a_window() -> None:
    before = {1: ("router", 10.0), 2: ("router", 3.0), 3: ("yolo", 50.0)}
    after = {
        1: ("router", 12.0),  # 2 s over a 4 s window: 0.5 core
        2: ("router", 6.6),  # 0.9 core: the busiest router
        3: ("yolo", 55.6),  # 1.4 cores
        4: ("haproxy", 0.4),  # started during the window: all its time counts
    }
    assert process_cpu.busiest_cores(before, after, 4.0) == {
        "haproxy": 0.1,
        "router": 0.9,
        "yolo": 1.4,
    }
    cores = process_cpu.cores(before, after, 4.0)
    assert {pid: (kind, round(used, 6)) for pid, (kind, used) in cores.items()} == {
        1: ("router", 0.5),
        2: ("router", 0.9),
        3: ("yolo", 1.4),
        4: ("haproxy", 0.1),
    }
    per_frame = process_cpu.cpu_ms_per_frame(before, after, 100)
    assert per_frame["cpu_ms_per_frame"] == {"haproxy": 4.0, "router": 56.0, "yolo": 56.0}
    assert per_frame["processes"] == {"haproxy": 1, "router": 2, "yolo": 1}
