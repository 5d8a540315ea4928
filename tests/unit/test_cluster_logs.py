"""A stopped test or benchmark cluster's Serve logs kept where ``SERVE_CLUSTER_KEEP_LOGS``
says (tests/serve_cluster.py): its Ray temp dir goes with it, and with it what says why a
replica never became ready."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve_cluster import KEEP_LOGS_ENV, keep_logs


def _ray_temp_dir(root: Path) -> Path:
    """A node's temp dir as Ray lays it out: ``session_latest/logs`` with Serve's own logs,
    each worker's stdout and stderr, and the node's daemons' logs."""
    temp = root / "ps-ray-abc"
    logs = temp / "session_2026-11-29_04-11-02_123456_789" / "logs"
    (logs / "serve").mkdir(parents=True)
    (logs / "serve" / "replica_app_RMBGDeployment_x1.log").write_text("compiled batch 16\n")
    (logs / "serve" / "controller_1.log").write_text("deploying\n")
    (logs / "worker-aa-01000000-42.err").write_text("Traceback: CUDA out of memory\n")
    (logs / "worker-aa-01000000-42.out").write_text("x" * 4096)
    (logs / "raylet.out").write_text("raylet\n")
    (temp / "session_latest").symlink_to(logs.parent.name)
    return temp


def test_a_stopped_clusters_serve_logs_and_worker_stderr_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = _ray_temp_dir(tmp_path)
    monkeypatch.setenv(KEEP_LOGS_ENV, str(tmp_path / "kept"))
    kept = keep_logs(str(temp))
    assert kept == tmp_path / "kept" / "ps-ray-abc"
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert files == [
        "serve/controller_1.log",
        "serve/replica_app_RMBGDeployment_x1.log",
        "worker-aa-01000000-42.err",
    ]
    assert (kept / "worker-aa-01000000-42.err").read_text() == "Traceback: CUDA out of memory\n"


def test_without_the_setting_or_a_session_nothing_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = _ray_temp_dir(tmp_path)
    monkeypatch.delenv(KEEP_LOGS_ENV, raising=False)
    assert keep_logs(str(temp)) is None
    # A node that never started has no session: nothing to keep, and no error.
    assert keep_logs(str(tmp_path / "never-started"), str(tmp_path / "kept")) is None
    assert not (tmp_path / "kept").exists()


def test_logs_that_cannot_be_kept_are_reported_and_never_raise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    temp = _ray_temp_dir(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # where the logs should go is a file: no directory fits there
    keep_logs(str(temp), str(blocked))  # in a teardown: the error being torn down stays
    err = capsys.readouterr().err
    assert err.startswith(f"{KEEP_LOGS_ENV}: keeping {temp / 'session_latest' / 'logs'} failed:")
    assert blocked.read_text() == ""
