"""Scripts run under Triton's interpreter (``TRITON_INTERPRET=1``), which is chosen when a
kernel is defined: each runs in a fresh Python process, so that the kernels it imports are
interpreted on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def interpreted(script: str) -> dict[str, float]:
    """Run ``script`` with Triton's interpreter; it prints one JSON object last."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
