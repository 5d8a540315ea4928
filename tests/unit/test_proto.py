"""The committed gRPC stubs are exactly what ``make protos`` generates from segmentor.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = "segmentation_client/proto/segmentor.proto"
GENERATED = ("segmentor_pb2.py", "segmentor_pb2.pyi", "segmentor_pb2_grpc.py")


def generate(into: Path) -> None:
    """The Makefile's ``protos`` command, writing under ``into`` instead of the tree."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the dev extra")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            PROTO,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def test_the_makefile_generates_stubs_with_the_flags_this_test_uses() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=." in makefile
    assert PROTO in makefile


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stubs_equal_freshly_generated_ones(tmp_path: Path, name: str) -> None:
    generate(tmp_path)
    fresh = (tmp_path / "segmentation_client/proto" / name).read_bytes()
    committed = (ROOT / "segmentation_client/proto" / name).read_bytes()
    assert committed == fresh, f"{name} is stale: run `make protos` and commit the result"


def test_the_stubs_describe_the_segmentor_service() -> None:
    from segmentation_client.proto import segmentor_pb2

    service = segmentor_pb2.DESCRIPTOR.services_by_name["Segmentor"]
    assert service.full_name == "productsegmentor.v1.Segmentor"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"RemoveBackground", "Segment", "Frames", "StreamFrames"}
    assert methods["StreamFrames"].server_streaming
    assert not methods["Frames"].server_streaming
    formats = segmentor_pb2.OutputFormat.keys()
    assert formats == ["RGBA_PNG", "MATTE_PNG", "RAW_ALPHA"]


def test_a_frames_request_round_trips_raw_bytes_unchanged() -> None:
    from segmentation_client.proto import segmentor_pb2 as pb

    raw = bytes(range(256)) * 3
    request = pb.FramesRequest(
        frames=[raw, b""],
        task=pb.TASK_SEGMENT,
        options=pb.DetectOptions(conf=0.5, classes=[0, 39]),
    )
    back = pb.FramesRequest.FromString(request.SerializeToString())
    assert list(back.frames) == [raw, b""]
    assert back.options.HasField("conf") and not back.options.HasField("iou")
    assert list(back.options.classes) == [0, 39]
