"""benchmarks.py_spy: py-spy on the process of the kind under load, once it is busy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.py_spy import LoadProfile

#: A busy process that process_cpu counts as a YOLO replica (its command line names it).
BUSY = """
import time
def spin_for_the_profile():
    end = time.monotonic() + 20
    while time.monotonic() < end:
        sum(range(1000))
spin_for_the_profile()
"""
NO_PY_SPY = {"error": "py-spy is not installed (pip install py-spy)"}


def test_the_busy_process_of_the_kind_is_recorded(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", BUSY, "YoloDeployment"])
    try:
        profile = LoadProfile("yolo", tmp_path, seconds=2, give_up_s=15).start()
        time.sleep(3.5)  # the load window
        result = profile.finish()
    finally:
        busy.kill()
        busy.wait()
    if profile.py_spy is None:
        assert result == NO_PY_SPY
        return
    entry = result[f"yolo-{busy.pid}"]  # chosen: the busy process of its kind
    refused = entry.get("error", "").lower()
    if "permission denied" in refused or "ptrace" in refused:
        pytest.skip(f"py-spy may not attach to another process here: {entry['error']}")
    assert "error" not in entry, entry
    assert (tmp_path / f"yolo-{busy.pid}.txt").exists()
    assert "spin_for_the_profile" in entry["summary"]
    assert entry["cores_while_sampled"] > 0.5


def test_without_load_of_the_kind_it_says_so(tmp_path: Path) -> None:
    profile = LoadProfile("no-such-kind", tmp_path, seconds=1, give_up_s=2).start()
    time.sleep(2.5)
    result = profile.finish()
    assert result == (
        NO_PY_SPY if profile.py_spy is None else {"error": "no no-such-kind load to profile"}
    )
    assert not list(tmp_path.iterdir())


def test_a_py_spy_that_does_not_finish_is_stopped_and_said(tmp_path: Path) -> None:
    """py-spy hung on a process (a fault that cannot be caused on purpose): a stand-in that
    never writes its stacks is stopped once the recording overruns, reaped, and the report
    says so for that process."""
    pid_file = tmp_path / "py-spy.pid"
    fake = tmp_path / "py-spy"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o755)
    busy = subprocess.Popen([sys.executable, "-c", BUSY, "YoloDeployment"])
    try:
        profile = LoadProfile("yolo", tmp_path / "stacks", seconds=1, give_up_s=15, overrun_s=1)
        profile.py_spy = str(fake)
        profile.start()
        time.sleep(3.5)  # the load window, as above
        started = time.monotonic()
        result = profile.finish()
    finally:
        busy.kill()
        busy.wait()
    assert result == {f"yolo-{busy.pid}": {"error": "py-spy did not finish"}}
    assert time.monotonic() - started < 10  # not the 60 s the stand-in would sleep
    hung = int(pid_file.read_text())
    assert not Path(f"/proc/{hung}").exists()  # killed and reaped, not left a zombie
