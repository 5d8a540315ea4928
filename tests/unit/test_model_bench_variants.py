"""``model_bench --fast-variants``: any combination of the fast path's steps, refused with a
message when it names an unknown step or compiles without ``--compile``."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.model_bench import bench_rmbg_fast


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (
            "sdpa+compile-decoder+graphs",
            "--fast-variants sdpa+compile-decoder+graphs: compiles, so needs --compile",
        ),
        ("sdpa+warp+graphs", "unknown --fast-variants ['sdpa+warp+graphs']"),
    ],
)
def test_a_variant_that_cannot_run_is_refused_before_any_model_loads(
    label: str, message: str
) -> None:
    rows: list[dict[str, Any]] = []
    with pytest.raises(SystemExit) as refused:
        bench_rmbg_fast("no-such-dir", [16], False, rows.append, only=[label])
    assert str(refused.value) == message
    assert rows == []
