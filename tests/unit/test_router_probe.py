"""The Router's header probe of a many-frame request: one call for all its files."""

from __future__ import annotations

from segmentation.errors import InvalidImageError, PayloadTooLargeError
from segmentation.imaging import EncodedImage
from segmentation_service.router import probe_images
from tests.conftest import encode, product_frame


def test_each_file_gets_its_header_or_its_own_error_in_order() -> None:
    good = encode(product_frame(64, 48, seed=1), "JPEG")
    large = encode(product_frame(400, 300, seed=2), "PNG")
    probed = probe_images([good, b"not an image at all", large, good], max_pixels=64 * 48)
    assert [type(p) for p in probed] == [
        EncodedImage,
        InvalidImageError,
        PayloadTooLargeError,
        EncodedImage,
    ]
    assert isinstance(probed[0], EncodedImage)
    assert (probed[0].width, probed[0].height, probed[0].format) == (64, 48, "JPEG")
    assert probed[0].data is good  # the bytes themselves, not a copy
