"""A model whose weights are missing fails to load with the path and what to do, not with a
download error or a traceback from deep inside a library."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmentation.errors import ModelLoadError
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation.models.yolo_segmentor import YoloSegmentor


def test_a_missing_yolo_checkpoint_is_named_not_downloaded(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "yolo11m-seg.pt"  # a release name Ultralytics would fetch
    with pytest.raises(ModelLoadError) as info:
        YoloSegmentor(str(missing), device="cpu")
    assert f"YOLO_MODEL={str(missing)!r}: no such file" in str(info.value)
    assert "Put the .pt file there" in str(info.value)
    assert not missing.exists()


def test_an_rmbg_directory_without_weights_names_the_download(tmp_path: Path) -> None:
    model = tmp_path / "RMBG-2.0"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        RMBG20Segmentor(str(model), device="cpu", trust_remote_code=True)
    assert f"{model} has no model.safetensors" in str(info.value)
    assert "hf download briaai/RMBG-2.0 --local-dir" in str(info.value)
