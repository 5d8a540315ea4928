"""py-spy on the service's busiest processes while a benchmark's load runs.

:class:`LoadProfile` is started before a load window: a thread of its own waits until the
processes of the kind under load (``benchmarks.process_cpu``'s kinds: ``yolo``, ``rmbg``...)
use on average ``busy_cores`` each, then records ``py-spy record --threads --format raw`` of
two Routers and one replica of that kind for ``seconds`` (non-blocking: the processes are not
stopped), and :meth:`LoadProfile.finish` gives each recording's summary
(``benchmarks.stack_summary``) and leaves the raw stacks in ``directory``. Where py-spy is not
installed, or the load never gets busy while it runs, the result says so instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import process_cpu
from benchmarks.stack_summary import report, summarise

#: Samples per second: enough for a few % resolution in 8 s, light on the sampled process.
RATE = 250


def _cores_by_pid(kind: str, interval: float) -> dict[int, float]:
    """Cores each process of ``kind`` used over the next ``interval`` seconds."""
    before = process_cpu.sample()
    time.sleep(interval)
    used = process_cpu.cores(before, process_cpu.sample(), interval)
    return {pid: cores for pid, (k, cores) in used.items() if k == kind}


class LoadProfile:
    def __init__(
        self,
        kind: str,
        directory: Path,
        *,
        seconds: float = 8.0,
        busy_cores: float = 0.3,
        give_up_s: float = 120.0,
        overrun_s: float = 60.0,
    ) -> None:
        self.kind = kind
        self.directory = directory
        self.seconds = seconds
        self.busy_cores = busy_cores
        self.give_up_s = give_up_s
        #: How long past ``seconds`` a recording may take before py-spy is stopped.
        self.overrun_s = overrun_s
        beside = Path(sys.executable).parent / "py-spy"  # a virtual environment's own
        self.py_spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        self._stop = threading.Event()
        self._recorded: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="py-spy", daemon=True)

    def start(self) -> LoadProfile:
        if self.py_spy:
            self._thread.start()
        return self

    def _targets(self) -> dict[int, float] | None:
        """The kind's processes once busy (pid -> cores), or None when the wait ends first."""
        deadline = time.monotonic() + self.give_up_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            cores = _cores_by_pid(self.kind, 1.0)
            if cores and sum(cores.values()) / len(cores) >= self.busy_cores:
                return cores
        return None

    def _run(self) -> None:
        cores = self._targets()
        if cores is None:
            self._recorded["error"] = f"no {self.kind} load to profile"
            return
        routers = _cores_by_pid("router", 1.0)
        chosen = [
            ("router", pid) for pid in sorted(routers, key=routers.__getitem__, reverse=True)[:2]
        ] + [(self.kind, max(cores, key=cores.__getitem__))]
        self.directory.mkdir(parents=True, exist_ok=True)
        recordings = []
        for kind, pid in chosen:
            path = self.directory / f"{kind}-{pid}.txt"
            command = [
                str(self.py_spy),
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--format",
                "raw",
                "--rate",
                str(RATE),
                "--duration",
                str(round(self.seconds)),
                "--nonblocking",
                "-o",
                str(path),
            ]
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            recordings.append((kind, pid, path, process))
        for kind, pid, path, process in recordings:
            try:
                _, stderr = process.communicate(timeout=self.seconds + self.overrun_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()  # reaped, not left a zombie for the rest of the benchmark
                stderr = "py-spy did not finish"
            name = f"{kind}-{pid}"
            if not path.exists():
                self._recorded[name] = {"error": stderr.strip()[-300:] or "no stacks written"}
                continue
            summary = summarise(path.read_text().splitlines())
            self._recorded[name] = {
                "stacks": str(path),
                "cores_while_sampled": round(summary.samples / (RATE * self.seconds), 2),
                "summary": report(
                    summary, 15, RATE * self.seconds, "segmentation|multipart|pickle|grpc"
                ),
            }

    def finish(self) -> dict[str, Any]:
        """What was recorded (waits for the recordings); say why not where nothing was."""
        if not self.py_spy:
            return {"error": "py-spy is not installed (pip install py-spy)"}
        self._stop.set()
        self._thread.join(timeout=self.seconds + self.overrun_s + 30)
        return dict(self._recorded)
