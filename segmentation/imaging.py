"""Decode and validate images before they reach a model.

Every request is decoded on its own, so a corrupt image fails only its own request. The
pixel limit is checked on the header, before any pixel buffer is allocated, which is what
stops decompression bombs.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segmentation.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaTypeError

#: PIL format names the service accepts.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000  # 8K UHD is 33 Mpx

# The header check below is the limit; PIL's own bomb check would only fire later, with a
# less useful message.
Image.MAX_IMAGE_PIXELS = None


def _pil_open() -> Callable[..., Image.Image]:
    """Pillow's own ``Image.open``.

    Ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that, on an
    unidentified file, tries to pip-install and register a HEIF plugin: client bytes must
    never trigger that.
    """
    opener = Image.open
    if getattr(opener, "__module__", "").startswith("ultralytics"):
        patches = sys.modules.get(opener.__module__)
        opener = getattr(patches, "_image_open", opener)
    return opener


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to a contiguous uint8 RGB array ``HxWx3``, oriented as a viewer shows it.

    Grayscale, 16-bit, palette, RGBA, CMYK, and EXIF-rotated images are all normalised here.
    """
    image = _open_checked(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return to_rgb_array(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"corrupt or truncated image: {exc}") from None


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """``data`` opened (its header parsed, no pixel decoded) and checked: an image in a format
    the service takes, with pixels, and at most ``max_pixels`` of them (what stops
    decompression bombs); the typed error of the first check that fails."""
    if not data:
        raise InvalidImageError("empty body: send the image bytes")
    try:
        # Only the decoders the service supports ever see client bytes.
        image: Image.Image = _pil_open()(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        other = _sniff_format(data)
        if other is not None:
            raise UnsupportedMediaTypeError(
                f"image format {other} is not supported; send " + ", ".join(SUPPORTED_FORMATS)
            ) from None
        raise InvalidImageError("the body is not a recognised image") from None
    except Exception as exc:
        raise InvalidImageError(f"corrupt or truncated image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    return image


def _sniff_format(data: bytes) -> str | None:
    """The name of an image format the service does not decode, when the bytes show one."""
    try:
        with _pil_open()(io.BytesIO(data)) as other:
            return other.format
    except Exception:
        return None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to uint8 RGB, keeping the full range of 16-bit images."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        peak = 65535 if image.mode != "I" else max(int(values.max()), 1)
        gray = (values.astype(np.float32) * (255.0 / peak)).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


#: EXIF orientations that turn the image a quarter (width and height swap when shown).
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass(frozen=True)
class EncodedImage:
    """An image whose header was read and checked, still encoded: what crosses the process
    boundary from the router to a model replica (a 1080p JPEG is ~0.3 MB; its pixels 6.2 MB).

    ``width`` and ``height`` are as a viewer shows the image (after its EXIF orientation), so
    ``pixels`` is what decoding it will allocate per channel. ``device_decodable`` marks plain
    RGB or grayscale JPEGs with no EXIF rotation: the device decoder (nvJPEG) gives exactly
    what :func:`decode_image` would; everything else is decoded on a CPU.
    """

    data: bytes
    width: int
    height: int
    format: str = "JPEG"
    device_decodable: bool = True

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class EncodedOutput:
    """An answer encoded where it was made (a cutout or matte as PNG, WebP or JPEG, or raw
    matte bytes), the size of the image it shows and its media type: what a model replica
    hands back across the process boundary. ``subject`` is the box ``(left, top, right,
    bottom)`` of the matte's non-zero pixels in the input image, ``foreground`` the box of
    the same in the answered image (after a crop and any scaling); None when the matte is 0
    everywhere or was not looked at (raw mattes)."""

    data: bytes
    width: int
    height: int
    media_type: str = "image/png"
    subject: tuple[int, int, int, int] | None = None
    foreground: tuple[int, int, int, int] | None = None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from what opening the file parsed, without decoding pixels
    (``getexif()`` of a PNG decodes the whole image when its EXIF is not ahead of the pixel
    data). A broken EXIF block counts as none here and fails where the image is decoded."""
    try:
        if getattr(image, "tag_v2", None) is not None:
            return 1  # TIFF: Pillow reports the size as shown already (and decodes it so)
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except Exception:
        return 1


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImage:
    """Read and check the header of ``data`` without decoding a pixel.

    Raises what :func:`decode_image` raises for a body that is empty, not an image, in a
    format the service does not take, or over ``max_pixels`` (decompression bombs are refused
    here, from the header). A header that parses but pixels that do not (a truncated file)
    fail later, where the image is decoded, with :class:`InvalidImageError` of their own.
    """
    with _open_checked(data, max_pixels) as image:
        width, height = image.size
        orientation = _orientation(image)
        plain = image.format == "JPEG" and image.mode in ("RGB", "L") and orientation == 1
        fmt = str(image.format)
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return EncodedImage(data, width, height, fmt, plain)
