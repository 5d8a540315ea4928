"""Decoding of unusual but valid images, and clear errors for bad ones."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaTypeError
from segmentation.imaging import decode_image
from tests.conftest import REPO_ROOT, encode, product_frame


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_common_formats_decode_to_rgb(fmt: str) -> None:
    frame = product_frame(64, 48)
    decoded = decode_image(encode(frame, fmt))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    tolerance = 0 if fmt in ("PNG", "BMP", "TIFF") else 40
    assert np.abs(decoded.astype(int) - frame.astype(int)).mean() <= tolerance


def test_grayscale() -> None:
    decoded = decode_image(_save(Image.new("L", (10, 8), 77), "PNG"))
    assert decoded.shape == (8, 10, 3) and (decoded == 77).all()


def test_16_bit_grayscale_keeps_its_range() -> None:
    values = np.full((6, 5), 65535, dtype=np.uint16)
    values[0, 0] = 0
    decoded = decode_image(_save(Image.fromarray(values), "PNG"))
    assert decoded.shape == (6, 5, 3)
    assert decoded[0, 0].tolist() == [0, 0, 0] and decoded[1, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    decoded = decode_image(_save(image, "PNG", transparency=0))
    assert decoded.shape == (4, 4, 3) and decoded[0, 0].tolist() == [10, 200, 30]


def test_rgba_drops_alpha() -> None:
    decoded = decode_image(_save(Image.new("RGBA", (3, 2), (1, 2, 3, 0)), "PNG"))
    assert decoded.shape == (2, 3, 3) and decoded[0, 0].tolist() == [1, 2, 3]


def test_cmyk_jpeg() -> None:
    decoded = decode_image(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert decoded.shape == (8, 8, 3)
    r, g, b = decoded[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 100%, 100%, 0) is red


def test_exif_orientation_is_honoured() -> None:
    image = Image.fromarray(product_frame(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(_save(image, "JPEG", exif=exif))
    assert decoded.shape == (40, 20, 3)


def test_one_pixel_image() -> None:
    assert decode_image(encode(np.zeros((1, 1, 3), np.uint8), "PNG")).shape == (1, 1, 3)


def test_empty_body() -> None:
    with pytest.raises(InvalidImageError, match="empty body"):
        decode_image(b"")


def test_not_an_image() -> None:
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        decode_image(b'{"hello": "world"}')


def test_truncated_jpeg() -> None:
    data = encode(product_frame(256, 256), "JPEG")
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_unsupported_format() -> None:
    data = _save(Image.new("RGB", (4, 4)), "GIF")
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        decode_image(data)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: the pixel check must fire before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_rejected_from_header() -> None:
    with pytest.raises(PayloadTooLargeError, match="100000x100000"):
        decode_image(_png_header_only(100_000, 100_000))


def test_pixel_limit_is_configurable() -> None:
    data = encode(product_frame(100, 100), "PNG")
    with pytest.raises(PayloadTooLargeError, match="over the limit of 5000"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)


def test_bad_bytes_never_reach_the_ultralytics_open_patch() -> None:
    """Ultralytics patches PIL.Image.open to pip-install a HEIF plugin on unknown files."""
    import ultralytics.utils.patches  # noqa: F401 - applies the patch

    assert Image.open.__module__.startswith("ultralytics")
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        decode_image(b"garbage bytes")
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        decode_image(_save(Image.new("RGB", (4, 4)), "GIF"))


def test_probe_marks_plain_jpegs_for_the_device_without_decoding_them() -> None:
    from segmentation.imaging import EncodedImage, probe_image

    data = encode(product_frame(64, 48), "JPEG")
    assert probe_image(data) == EncodedImage(data, 64, 48, "JPEG", True)
    gray = _save(Image.new("L", (9, 7), 50), "JPEG")
    assert probe_image(gray) == EncodedImage(gray, 9, 7, "JPEG", True)
    # Only the header is read: a JPEG cut after its header probes fine and fails to decode.
    cut = encode(product_frame(640, 480), "JPEG")[:4000]
    assert probe_image(cut).pixels == 640 * 480
    with pytest.raises(InvalidImageError):
        decode_image(cut)


@pytest.mark.parametrize(
    ("make", "fmt", "size"),
    [
        (lambda: encode(product_frame(16, 12), "PNG"), "PNG", (16, 12)),
        (lambda: _save(Image.new("CMYK", (8, 6)), "JPEG"), "JPEG", (8, 6)),
        # EXIF orientation 6 turns it a quarter: shown (and decoded) 20 wide, 40 high
        (
            lambda: _save(Image.fromarray(product_frame(40, 20)), "JPEG", exif=_rotated_exif()),
            "JPEG",
            (20, 40),
        ),
    ],
    ids=["png", "cmyk", "exif-rotated"],
)
def test_probe_leaves_other_images_to_the_cpu_with_their_shown_size(
    make: object, fmt: str, size: tuple[int, int]
) -> None:
    from segmentation.imaging import probe_image

    data = make()  # type: ignore[operator]
    image = probe_image(data)
    assert (image.format, image.device_decodable) == (fmt, False)
    assert (image.width, image.height) == size
    decoded = decode_image(data)
    assert decoded.shape[:2] == (image.height, image.width)


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def test_probe_refuses_what_decoding_would_from_the_header() -> None:
    from segmentation.imaging import probe_image

    with pytest.raises(PayloadTooLargeError):
        probe_image(encode(product_frame(100, 100), "JPEG"), max_pixels=5000)
    with pytest.raises(InvalidImageError, match="empty body"):
        probe_image(b"")
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        probe_image(b"not an image")
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        probe_image(_save(Image.new("RGB", (4, 4)), "GIF"))


def test_probe_refuses_a_decompression_bomb_without_allocating_its_pixels() -> None:
    """An 8000x8000 PNG of one colour is ~70 kB; its RGB pixels would be 192 MB."""
    import tracemalloc

    from segmentation.imaging import probe_image

    bomb = _save(Image.new("L", (8000, 8000)), "PNG")
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    with pytest.raises(PayloadTooLargeError, match="8000x8000"):
        probe_image(bomb, max_pixels=40_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10_000_000


def test_device_decode_matches_cpu_decode_and_isolates_bad_images() -> None:
    import torch

    from segmentation.device_decode import decode_jpegs_on
    from segmentation.imaging import EncodedImage

    good = encode(product_frame(64, 48, seed=3), "JPEG")
    truncated = good[: len(good) // 3]
    out = decode_jpegs_on(
        torch.device("cpu"),
        [EncodedImage(good, 64, 48), EncodedImage(truncated, 64, 48), EncodedImage(good, 64, 48)],
    )
    assert isinstance(out[1], InvalidImageError)
    assert out[0].shape == (3, 48, 64) and out[0].dtype == torch.uint8
    reference = decode_image(good)
    assert np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).max() <= 2


def test_a_gpu_out_of_memory_in_the_jpeg_decoder_is_raised_not_blamed_on_the_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU cannot run out of GPU memory: the decoder's OOM is injected. It must reach the
    OOM-safe runner (which splits the batch, then answers 503), never become a 400."""
    import torch
    import torchvision.io

    from segmentation.batching import AdaptiveBatchCap, OOMSafeRunner
    from segmentation.device_decode import decode_jpegs_on
    from segmentation.errors import OverloadedError
    from segmentation.imaging import EncodedImage

    def no_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 MiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_memory)
    good = encode(product_frame(64, 48, seed=3), "JPEG")
    jpegs = [EncodedImage(good, 64, 48)] * 2
    with pytest.raises(torch.OutOfMemoryError):
        decode_jpegs_on(torch.device("cpu"), jpegs)
    runner = OOMSafeRunner(
        lambda items: decode_jpegs_on(torch.device("cpu"), items), AdaptiveBatchCap(2)
    )
    outputs, report = runner(jpegs)
    assert all(isinstance(o, OverloadedError) for o in outputs)
    assert report.oom_splits >= 1


def test_probing_a_png_reads_its_header_and_never_its_pixels() -> None:
    """Pillow's ``getexif()`` decodes a whole PNG whose EXIF is not ahead of its pixels: the
    probe must not, or the router would decode every PNG it admits."""
    import tracemalloc

    from segmentation.imaging import probe_image

    png = _save(Image.fromarray(np.full((3000, 4000, 3), 90, np.uint8)), "PNG")  # 36 MB decoded
    tracemalloc.start()
    image = probe_image(png)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (image.width, image.height, image.format) == (4000, 3000, "PNG")
    assert peak < 5_000_000
    rotated = Image.fromarray(product_frame(40, 20))
    exif = _rotated_exif()
    for fmt in ("PNG", "WEBP", "TIFF"):
        probed = probe_image(_save(rotated, fmt, exif=exif))
        assert (probed.width, probed.height) == (20, 40), fmt  # shown a quarter turned
        assert decode_image(_save(rotated, fmt, exif=exif)).shape[:2] == (40, 20), fmt


def test_device_decode_reads_the_bytes_in_place_without_a_warning_escaping(tmp_path: Path) -> None:
    """The read-only buffer's warning is silenced at the decoder's call site, so a process
    that turns warnings into errors still decodes, as libjpeg decodes."""
    script = (
        "import sys, numpy as np, torch\n"
        "from segmentation.device_decode import decode_jpegs_on\n"
        "from segmentation.imaging import EncodedImage, decode_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "out = decode_jpegs_on(torch.device('cpu'), [EncodedImage(data, 64, 48)] * 2)\n"
        "ref = decode_image(data).astype(int)\n"
        "print(max(int(np.abs(o.permute(1, 2, 0).numpy().astype(int) - ref).max()) for o in out))\n"
    )
    path = tmp_path / "frame.jpg"
    path.write_bytes(encode(product_frame(64, 48, seed=3), "JPEG"))
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) <= 2


def test_device_decode_hands_the_decoder_each_images_own_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No copy before the decoder: the tensor each JPEG is read through is made on that
    image's own bytes object (``torch.frombuffer`` observed, still doing its work)."""
    import torch

    from segmentation.device_decode import decode_jpegs_on
    from segmentation.imaging import EncodedImage

    buffers: list[object] = []
    real = torch.frombuffer

    def observed(buffer: object, *args: object, **kwargs: object) -> torch.Tensor:
        buffers.append(buffer)
        return real(buffer, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "frombuffer", observed)
    images = [
        EncodedImage(encode(product_frame(64, 48, seed=seed), "JPEG"), 64, 48) for seed in (3, 4)
    ]
    out = decode_jpegs_on(torch.device("cpu"), images)
    assert len(buffers) == 2
    assert all(seen is image.data for seen, image in zip(buffers, images, strict=True))
    for image, tensor in zip(images, out, strict=True):
        reference = decode_image(image.data).astype(int)
        assert np.abs(tensor.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 2
