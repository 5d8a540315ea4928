"""The benchmarks' frame sources and their per-frame stage arithmetic."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from benchmarks.frames import frame_set, read_frames, write_frames
from benchmarks.replica_stages import per_frame_ms


def _replica(name: str, frames_ok: int, batches: int, mean_ms: float) -> dict[str, object]:
    return {
        "model": name,
        "frames_ok": frames_ok,
        "stages": {"model:postprocess": {"count": batches, "mean_ms": mean_ms}},
    }


def test_postprocess_per_frame_counts_only_the_window_and_the_named_model() -> None:
    before = {
        ("yolo11-seg", 1): _replica("yolo11-seg", 100, 10, 5.0),  # 50 ms over 100 frames
        ("rmbg-2.0", 2): _replica("rmbg-2.0", 40, 40, 1.0),
    }
    after = {
        # +60 frames in 4 batches; total postprocess 50 -> 50 + 120 = 170 ms over 14 batches
        ("yolo11-seg", 1): _replica("yolo11-seg", 160, 14, 170 / 14),
        # a replica that started during the window counts from zero
        ("yolo11-seg", 3): _replica("yolo11-seg", 20, 2, 15.0),
        ("rmbg-2.0", 2): _replica("rmbg-2.0", 50, 50, 1.2),
    }
    # (120 + 30) ms over (60 + 20) frames
    assert per_frame_ms(before, after, "yolo") == 1.875
    # (60 - 40) ms over 10 frames
    assert per_frame_ms(before, after, "rmbg") == 2.0


def test_no_frames_answered_gives_no_per_frame_time() -> None:
    snap = {("yolo11-seg", 1): _replica("yolo11-seg", 100, 10, 5.0)}
    assert per_frame_ms(snap, snap, "yolo") is None


def test_synthetic_frames_are_jpegs_of_scenes_with_several_objects(tmp_path) -> None:
    frames = frame_set("synthetic", 160, 96, count=3)
    assert len(frames.jpegs) == 3
    assert frames.objects is not None and min(frames.objects) >= 2
    assert frames.mean_objects == round(sum(frames.objects) / 3, 2)
    for jpeg in frames.jpegs:
        image = Image.open(io.BytesIO(jpeg))
        assert (image.format, image.size) == ("JPEG", (160, 96))
    write_frames(frames, tmp_path)
    assert read_frames(tmp_path) == list(frames.jpegs)


def test_plain_frames_have_no_ground_truth() -> None:
    frames = frame_set("plain", 64, 48, count=2)
    assert len(frames.jpegs) == 2 and frames.mean_objects is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cuda-graphs", "yes"], "--cuda-graphs: expected off, on or off,on, got 'yes'"),
        (
            ["--with-weights", "--model-path", "standin:tiny-birefnet"],
            "--with-weights needs the model's directory as --model-path, not "
            "'standin:tiny-birefnet'",
        ),
        (["--model", "yolo", "--with-weights"], "--serve-config and --with-weights are for"),
        (["--server-only"], "--server-only needs --serve-config"),
    ],
)
def test_video_bench_refuses_arguments_it_cannot_run(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused with the reason before any clip is made or model built (exit status 2)."""
    from benchmarks import video_bench

    with pytest.raises(SystemExit) as exit_info:
        video_bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
