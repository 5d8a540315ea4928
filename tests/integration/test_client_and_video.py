"""The Python client and segment-video against the running demo app (stand-ins on the CPU)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import segmentation_standins as standins
from segmentation.imaging import decode_image
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from segmentation_client.client import (
    AsyncSegmentorClient,
    FrameError,
    Image,
    Segmentation,
    SegmentorClient,
    ServiceError,
)
from segmentation_client.segment_video import main as segment_video
from tests.conftest import assert_cutout, encode, product_frame, write_video
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rmbg() -> RMBG20Segmentor:
    """The stand-in the demo serves, in-process: the expected answers."""
    return RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=256)


def test_sync_client_typed_results(cluster: Cluster, rmbg: RMBG20Segmentor) -> None:
    frame = product_frame(160, 120, seed=3)
    with SegmentorClient(cluster.url, frame_format="png") as client:
        cutout = client.remove_background(frame)
        pixels = cutout.to_array()
        assert_cutout(pixels, frame)
        expected = rmbg.predict([frame])[0]
        assert np.abs(cutout.alpha().astype(int) - expected.astype(int)).max() <= 2
        matte = client.remove_background(frame, output="mask")
        assert matte.to_array().shape == (120, 160)

        found = client.segment(frame, conf=0.25, classes=[1], max_det=5)
        assert isinstance(found, Segmentation) and (found.width, found.height) == (160, 120)
        assert 0 < len(found.instances) <= 5
        assert all(i.class_name == "box" and i.mask().shape == (120, 160) for i in found.instances)

        products = client.products(frame, margin=0.0)
        assert len(products.products) > 0
        first = products.products[0]
        x1, y1, x2, y2 = first.crop_box
        assert first.cutout.to_array().shape == (y2 - y1, x2 - x1, 4)

        # Many frames in one request, in order; a broken frame fails alone.
        frames = [product_frame(64, 48, seed=i) for i in range(3)]
        results = client.frames([frames[0], b"\xff\xd8broken", frames[2]])
        assert isinstance(results[1], FrameError) and results[1].index == 1
        for result, source in zip([results[0], results[2]], [frames[0], frames[2]], strict=True):
            assert isinstance(result, Image)
            assert_cutout(result.to_array(), source)

        # Order is kept with requests in flight at once.
        mattes = client.map(lambda f: client.remove_background(f, output="mask").to_array(), frames)
        for got, source in zip(mattes, frames, strict=True):
            assert np.abs(got.astype(int) - rmbg.predict([source])[0].astype(int)).max() <= 2

        with pytest.raises(ServiceError) as error:
            client.remove_background(b"GIF89a not supported")
        assert error.value.status in (400, 415) and error.value.code
        assert client.retries == 0


def test_async_client(cluster: Cluster) -> None:
    frames = [product_frame(96, 64, seed=20 + i) for i in range(6)]

    async def run() -> list[Segmentation]:
        async with AsyncSegmentorClient(cluster.url, max_concurrency=3) as client:
            return await asyncio.gather(*(client.segment(f) for f in frames))

    results = asyncio.run(run())
    assert [(r.width, r.height) for r in results] == [(96, 64)] * 6


def test_segment_video_through_the_service(
    cluster: Cluster, tmp_path: Path, rmbg: RMBG20Segmentor
) -> None:
    frames = write_video(
        tmp_path / "clip.mov", [product_frame(128, 96, seed=40 + i) for i in range(10)], fps=30
    )
    out = tmp_path / "seq"
    report = tmp_path / "report.json"
    code = segment_video(
        [
            str(tmp_path / "clip.mov"),
            "-o",
            str(out),
            "--server",
            cluster.url,
            "--no-progress",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    summary = json.loads(report.read_text())
    assert (summary["mode"], summary["frames"]) == ("server", 10)
    assert "model_libraries" not in summary["startup"]  # no model in this process
    assert summary["time_to_first_frame"] > 0 and summary["stages"]["encode"] > 0
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == 10
    for png, frame in zip(written, frames, strict=True):
        pixels = np.asarray(PILImage.open(png))
        assert_cutout(pixels, frame)  # count and order kept
        # The client sent a JPEG (quality 95): the matte is the model's answer for that JPEG.
        sent = decode_image(encode(frame, "JPEG", quality=95))
        expected = rmbg.predict([sent])[0]
        assert np.abs(pixels[..., 3].astype(int) - expected.astype(int)).max() <= 2

    video = tmp_path / "objects.mov"
    code = segment_video(
        [
            str(tmp_path / "clip.mov"),
            "-o",
            str(video),
            "--server",
            cluster.url,
            "--model",
            "yolo",
            "--encode",
            "small",
        ]
    )
    assert code == 0
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 30
        frames = list(container.decode(stream))
    assert len(frames) == 10
    # Each frame at its source frame's time (1/30 s apart), the clip's length kept.
    assert [round(f.time * 30) for f in frames] == list(range(10))
    manifest = json.loads((out / "segment-video.json").read_text())
    assert manifest["server"] == cluster.url
    assert manifest["timestamps"]["times"] == pytest.approx([i / 30 for i in range(10)], abs=1e-6)


def test_segment_video_reports_an_unreachable_server(tmp_path: Path, capsys) -> None:
    write_video(tmp_path / "clip.mov", [product_frame(32, 32)], fps=5)
    code = segment_video(
        [str(tmp_path / "clip.mov"), "-o", str(tmp_path / "o"), "--server", "http://127.0.0.1:9"]
    )
    # A service error (exit 1), not an output or input problem (2): the client's typed error.
    assert code == 1
    err = capsys.readouterr().err
    assert "segment-video: error: ServiceUnreachable" in err and "127.0.0.1:9" in err
    assert "Traceback" not in err


def test_segment_video_refines_edges_and_lays_cutouts_over_a_colour_through_the_service(
    cluster: Cluster, tmp_path: Path
) -> None:
    import torch

    from segmentation.compose import compose
    from segmentation.options import CutoutOptions

    clip = tmp_path / "clip.mov"
    frames = write_video(clip, [product_frame(128, 96, seed=60 + i) for i in range(4)], fps=30)

    def run(output: Path, *extra: str, server: str = cluster.url) -> int:
        argv = [str(clip), "-o", str(output), "--server", server, "--no-progress", *extra]
        return segment_video(argv)

    assert run(tmp_path / "plain") == 0
    assert run(tmp_path / "refined", "--refine") == 0
    grpc_url = f"grpc://{cluster.grpc_target}"
    assert run(tmp_path / "refined-grpc", "--refine", server=grpc_url) == 0
    assert run(tmp_path / "on-white", "--bg-color", "white") == 0
    white = CutoutOptions(background=(255, 255, 255, 255))
    with SegmentorClient(cluster.url) as client:  # JPEG uploads, as segment-video's
        for index, frame in enumerate(frames):
            plain, refined, refined_grpc, on_white = (
                np.asarray(PILImage.open(tmp_path / name / f"frame_{index:06d}.png"))
                for name in ("plain", "refined", "refined-grpc", "on-white")
            )
            alpha = plain[..., 3]
            soft = (alpha > 0) & (alpha < 255)
            assert soft.any() and (alpha == 255).any()
            # Refined: the same matte; the frame's own pixels where it is 0 or 255, and at
            # the soft edges the colours the service estimated (for the JPEG it was sent).
            assert np.array_equal(refined[..., 3], alpha)
            assert np.array_equal(refined[~soft], plain[~soft])
            answer = client.remove_background(frame, output="rgba", refine=True).to_array()
            assert np.array_equal(refined[soft], answer[soft])
            assert (refined[soft] != plain[soft]).any()
            assert np.array_equal(refined_grpc, refined)  # the same options over gRPC
            # On white: the frame under the demo model's matte, composed as the service
            # composes, within one level.
            rgb = torch.from_numpy(frame).permute(2, 0, 1).contiguous()
            expected = compose(rgb, torch.from_numpy(alpha.copy()), white).pixels
            assert on_white.shape == (96, 128, 3)
            assert np.abs(on_white.astype(int) - expected.astype(int)).max() <= 1
