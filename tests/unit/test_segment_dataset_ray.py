"""segment-dataset when Ray cannot be started or reached: one line, exit 2 (a set-up error,
nothing processed), never a traceback and exit 1, which would say some inputs failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from segmentation_pipelines import segment_dataset
from tests.conftest import product_frame


def test_a_ray_that_cannot_start_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray")
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(product_frame(32, 24)).save(source / "a.png")

    def fail(**options: Any) -> None:  # what a local start on an overloaded machine raised
        raise Exception(
            "Failed to get node info\nThe current node timed out during startup. This could "
            "happen because some of the raylet failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "init", fail)
    code = segment_dataset.main([str(source), str(tmp_path / "out"), "--address", "local"])
    said = capsys.readouterr().err
    assert code == 2
    assert said.count("\n") == 1, said
    assert "could not start or reach Ray at --address local" in said
    assert "timed out during startup" in said and "nothing was processed" in said
    assert not list((tmp_path / "out").iterdir())  # nothing written
