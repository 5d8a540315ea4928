"""The end of a benchmark that times two paths and checks that they agree."""

from __future__ import annotations

import json
from typing import Any


def finish(result: dict[str, Any], out: str | None, agree: bool) -> int:
    """Print ``result`` as JSON, write it to ``out`` if given; the exit status: 1 when the
    paths did not ``agree`` (a faster path that answers differently is no result)."""
    print(json.dumps(result, indent=1), flush=True)
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if agree else 1
