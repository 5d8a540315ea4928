"""Cutout options and the drop-in endpoints (remove.bg, rembg) over real HTTP against the demo
application (stand-in models on the CPU)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from segmentation_client import SegmentorClient, ServiceError
from tests.conftest import encode, product_frame
from tests.serve_cluster import Cluster

pytestmark = pytest.mark.integration

FRAME = product_frame(320, 200, seed=21)
PNG = encode(FRAME, "PNG")


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def cutout(client: httpx.Client, **params: object) -> httpx.Response:
    return client.post(
        "/v1/remove-background",
        params=params,
        content=PNG,
        headers={"Content-Type": "image/png"},
    )


@pytest.fixture(scope="module")
def matte(client: httpx.Client) -> np.ndarray:
    response = cutout(client, output="mask")
    assert response.status_code == 200, response.text
    alpha = np.asarray(decoded(response.content))
    assert (alpha > 0).any() and (alpha == 0).any()
    return alpha


def subject_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(alpha)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


# -- /v1/remove-background options ----------------------------------------------------------
def test_a_refined_cutout_keeps_the_matte_and_the_opaque_pixels(
    client: httpx.Client, matte: np.ndarray
) -> None:
    response = cutout(client, refine="true")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    rgba = np.asarray(decoded(response.content))
    assert rgba.shape == (200, 320, 4)
    assert np.array_equal(rgba[..., 3], matte)
    opaque = matte == 255
    diff = np.abs(rgba[..., :3][opaque].astype(int) - FRAME[opaque].astype(int))
    assert diff.max() <= 1
    assert not rgba[..., :3][matte == 0].any()


def test_a_jpeg_on_a_background_colour(client: httpx.Client, matte: np.ndarray) -> None:
    response = cutout(client, format="jpeg", background="0000ff", quality=95)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = decoded(response.content)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (320, 200))
    pixels = np.asarray(image).astype(int)
    background = matte == 0
    assert np.abs(pixels[background] - [0, 0, 255]).mean() < 8


def test_crop_cuts_to_the_subject_and_its_margin(client: httpx.Client, matte: np.ndarray) -> None:
    left, top, right, bottom = subject_box(matte)
    response = cutout(client, crop="true", crop_margin="4px")
    assert response.status_code == 200
    rgba = np.asarray(decoded(response.content))
    assert rgba.shape == (bottom - top + 8, right - left + 8, 4)
    inside = rgba[4:-4, 4:-4]
    assert np.array_equal(inside[..., 3], matte[top:bottom, left:right])


def test_lossless_webp_is_the_png_cutout(client: httpx.Client) -> None:
    png = np.asarray(decoded(cutout(client).content))
    response = cutout(client, format="webp", lossless="true")
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    webp = decoded(response.content)
    assert webp.format == "WEBP"
    assert np.array_equal(np.asarray(webp.convert("RGBA")), png)
    lossy = cutout(client, format="webp", quality=50)
    assert lossy.status_code == 200 and decoded(lossy.content).mode == "RGBA"


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"format": "jpeg"}, "format=jpeg has no alpha channel"),
        ({"background": "nocolour"}, "colour 'nocolour'"),
        ({"quality": 0}, "quality"),
        ({"output": "mask", "refine": "true"}, "apply to output=rgba"),
        ({"lossless": "true"}, "lossless applies to format=webp"),
        ({"crop_margin": "-5px"}, "crop_margin"),
        ({"format": "gif"}, "format"),
    ],
)
def test_bad_cutout_options_are_422_with_a_clear_message(
    client: httpx.Client, params: dict[str, object], fragment: str
) -> None:
    response = cutout(client, **params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert fragment in response.json()["error"]["message"]


def test_products_take_the_cutout_options(client: httpx.Client) -> None:
    frame = product_frame(400, 300, seed=22)
    response = client.post(
        "/v1/products",
        params={"background": "white", "format": "webp", "max_det": 3},
        content=encode(frame, "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    products = response.json()["products"]
    assert products
    for product in products:
        assert product["media_type"] == "image/webp"
        image = decoded(base64.b64decode(product["cutout"]))
        left, top, right, bottom = product["crop_box"]
        assert image.format == "WEBP" and image.size == (right - left, bottom - top)
        assert image.mode == "RGB"  # an opaque background: no alpha channel
        assert product["cutout_box"] == product["crop_box"]


def test_a_product_cut_to_its_subject_says_which_pixels_it_covers(client: httpx.Client) -> None:
    frame = product_frame(400, 300, seed=22)
    response = client.post(
        "/v1/products",
        params={"crop": "true", "crop_margin": "4px", "max_det": 3},
        content=encode(frame, "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    products = response.json()["products"]
    assert products
    cut = 0
    for product in products:
        image = np.asarray(decoded(base64.b64decode(product["cutout"])))
        left, top, right, bottom = product["cutout_box"]
        assert image.shape[:2] == (bottom - top, right - left)
        crop_left, crop_top, crop_right, crop_bottom = product["crop_box"]
        if image[..., 3].any() and (right - left, bottom - top) != (
            crop_right - crop_left,
            crop_bottom - crop_top,
        ):
            # cut to the subject: 4 px of transparent margin on each side, the matte inside
            alpha = image[..., 3]
            assert not alpha[:4].any() and not alpha[-4:].any()
            assert not alpha[:, :4].any() and not alpha[:, -4:].any()
            assert alpha[4:-4, 4:-4].any()
            cut += 1
    assert cut, "no product was cut to its subject"


def test_the_python_client_takes_the_cutout_options(cluster: Cluster) -> None:
    with SegmentorClient(cluster.url) as client:
        image = client.remove_background(
            PNG, refine=True, background=(0, 0, 255), format="jpeg", quality=95
        )
        assert image.content_type == "image/jpeg"
        assert image.to_array().shape == (200, 320, 3)
        assert (image.alpha() == 255).all()
        cropped = client.remove_background(PNG, crop=True, crop_margin="10%", format="webp")
        assert cropped.content_type == "image/webp" and cropped.to_array().shape[2] == 4
        found = client.products(
            encode(product_frame(400, 300, seed=22), "PNG"), max_det=3, background="white"
        )
        assert found.products
        assert all(p.cutout.to_array().ndim == 3 for p in found.products)
        with pytest.raises(ServiceError) as caught:
            client.remove_background(PNG, format="jpeg")
        assert caught.value.status == 422 and "no alpha channel" in caught.value.message


# -- remove.bg --------------------------------------------------------------------------------
def removebg(client: httpx.Client, **kwargs: object) -> httpx.Response:
    return client.post("/v1.0/removebg", **kwargs)  # type: ignore[arg-type]


def errors_of(response: httpx.Response) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = response.json()["errors"]
    return errors


def test_removebg_published_curl_example(client: httpx.Client, matte: np.ndarray) -> None:
    """remove.bg's sample: ``-H 'X-API-Key: ...' -F image_file=@file.jpg -F size=auto``."""
    response = removebg(
        client,
        headers={"X-API-Key": "INSERT_YOUR_API_KEY_HERE"},
        files={"image_file": ("file.png", PNG, "image/png")},
        data={"size": "auto"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-width"] == "320" and response.headers["x-height"] == "200"
    assert response.headers["x-type"] == "other"
    assert response.headers["x-credits-charged"] == "0"
    rgba = np.asarray(decoded(response.content))
    assert rgba.shape == (200, 320, 4)
    assert np.array_equal(rgba[..., 3], matte)


def test_removebg_published_json_example_and_json_answer(client: httpx.Client) -> None:
    """remove.bg's JSON sample: ``{"image_file_b64": ..., "size": "auto"}``."""
    body = {"image_file_b64": base64.b64encode(PNG).decode(), "size": "auto", "format": "jpg"}
    response = removebg(client, json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    result = base64.b64decode(response.json()["data"]["result_b64"])
    image = decoded(result)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (320, 200))
    corner = np.asarray(image)[:5, :5].astype(int)
    assert np.abs(corner - 255).max() <= 3  # jpg without bg_color: on white


def test_removebg_form_fields_size_crop_channels(client: httpx.Client, matte: np.ndarray) -> None:
    big = product_frame(1000, 700, seed=23)
    preview = removebg(
        client,
        data={"image_file_b64": base64.b64encode(encode(big, "JPEG")).decode()},
    )
    assert preview.status_code == 200, preview.text
    width, height = int(preview.headers["x-width"]), int(preview.headers["x-height"])
    assert width * height <= 250_000 and abs(width / height - 1000 / 700) < 0.01
    assert decoded(preview.content).size == (width, height)

    left, top, right, bottom = subject_box(matte)
    cropped = removebg(
        client,
        files={"image_file": ("f.png", PNG, "image/png")},
        data={"size": "full", "crop": "true", "channels": "alpha", "type": "product"},
    )
    assert cropped.status_code == 200, cropped.text
    mask = decoded(cropped.content)
    assert mask.mode == "L" and mask.size == (right - left, bottom - top)
    assert np.array_equal(np.asarray(mask), matte[top:bottom, left:right])
    assert cropped.headers["x-type"] == "product"


def foreground_answered(response: httpx.Response) -> tuple[int, int, int, int]:
    """``(top, left, width, height)`` of the foreground as the answer gives it: its headers,
    and the same in ``data`` of a JSON answer."""
    names = ("top", "left", "width", "height")
    position = tuple(int(response.headers[f"x-foreground-{name}"]) for name in names)
    if response.headers["content-type"] == "application/json":
        data = response.json()["data"]
        assert tuple(data[f"foreground_{name}"] for name in names) == position
    top, left, width, height = position
    return top, left, width, height


def foreground_shown(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, left, width, height)`` of the non-zero pixels of ``alpha``."""
    left, top, right, bottom = subject_box(alpha)
    return top, left, right - left, bottom - top


def test_removebg_answers_where_the_foreground_is_in_the_result(
    client: httpx.Client, matte: np.ndarray
) -> None:
    """``X-Foreground-*`` and ``data.foreground_*`` are the box of the answered image's
    non-zero alpha: in the whole frame, cropped with a margin past the frame's edge, and
    scaled down to remove.bg's preview size."""
    image = {"image_file": ("f.png", PNG, "image/png")}
    whole = removebg(client, files=image, data={"size": "full"})
    assert whole.status_code == 200, whole.text
    alpha = np.asarray(decoded(whole.content))[..., 3]
    assert foreground_answered(whole) == foreground_shown(alpha) == foreground_shown(matte)

    left, top, right, bottom = subject_box(matte)
    cropped = removebg(
        client,
        files=image,
        data={"size": "full", "crop": "true", "crop_margin": "200px"},
        headers={"Accept": "application/json"},
    )
    assert cropped.status_code == 200, cropped.text
    result = decoded(base64.b64decode(cropped.json()["data"]["result_b64"]))
    assert result.size == (right - left + 400, bottom - top + 400)  # past every edge of 320x200
    shown = foreground_shown(np.asarray(result)[..., 3])
    assert foreground_answered(cropped) == shown == (200, 200, right - left, bottom - top)

    big = product_frame(1000, 700, seed=23)
    for data in ({}, {"crop": "true", "crop_margin": "10%"}):
        scaled = removebg(client, files={"image_file": ("b.jpg", encode(big, "JPEG"))}, data=data)
        assert scaled.status_code == 200, scaled.text
        rgba = np.asarray(decoded(scaled.content))
        assert rgba.shape[0] * rgba.shape[1] <= 250_000
        assert foreground_answered(scaled) == foreground_shown(rgba[..., 3])

    on_white = removebg(
        client,
        files=image,
        data={"size": "full", "crop": "true", "crop_margin": "5px", "bg_color": "white"},
        headers={"Accept": "application/json"},
    )
    assert on_white.status_code == 200, on_white.text
    assert decoded(base64.b64decode(on_white.json()["data"]["result_b64"])).mode == "RGB"
    assert foreground_answered(on_white) == (5, 5, right - left, bottom - top)


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        ({"image_url": "https://www.remove.bg/example.jpg"}, "invalid_image_url", "never fetches"),
        ({}, "missing_source", "No image given"),
        ({"image_file_b64": "aGVsbG8=", "size": "huge"}, "invalid_size", "size"),
        ({"image_file_b64": "aGVsbG8=", "format": "zip"}, "invalid_format", "format"),
        ({"image_file_b64": "aGVsbG8=", "bg_color": "notacolour"}, "invalid_bg_color", "bg_color"),
        ({"image_file_b64": "aGVsbG8=", "crop_margin": "lots"}, "invalid_crop_margin", "margin"),
        ({"image_file_b64": "aGVsbG8="}, "failed_to_read_image", "reading the image"),
    ],
)
def test_removebg_errors_have_its_shape_and_codes(
    client: httpx.Client, data: dict[str, str], code: str, fragment: str
) -> None:
    response = removebg(client, data=data)
    assert response.status_code == 400, response.text
    (error,) = errors_of(response)
    assert error["code"] == code
    assert fragment in error["title"] + error.get("detail", "")


def test_the_removebg_python_package_works_against_the_service(
    cluster: Cluster, tmp_path: Path, matte: np.ndarray
) -> None:
    """``removebg`` from PyPI, pointed at this service instead of api.remove.bg."""
    removebg_package = pytest.importorskip("removebg.removebg")
    path = tmp_path / "frame.png"
    path.write_bytes(PNG)
    original = removebg_package.API_ENDPOINT
    removebg_package.API_ENDPOINT = f"{cluster.url}/v1.0/removebg"
    try:
        remover = removebg_package.RemoveBg("local-key", str(tmp_path / "errors.log"))
        remover.remove_background_from_img_file(str(path), size="full", bg_color="white")
    finally:
        removebg_package.API_ENDPOINT = original
    result = decoded((tmp_path / "frame.png_no_bg.png").read_bytes())
    assert result.size == (320, 200) and result.mode == "RGB"  # opaque white: no alpha
    pixels = np.asarray(result).astype(int)
    assert np.abs(pixels[matte == 0] - 255).mean() <= 3  # format auto on white: a JPEG


# -- rembg ------------------------------------------------------------------------------------
def rembg(
    client: httpx.Client, params: dict[str, str] | None = None, **data: str
) -> httpx.Response:
    return client.post(
        "/api/remove",
        params=params,
        files={"file": ("input.png", PNG, "image/png")},
        data=data,
    )


def test_rembg_published_curl_example(client: httpx.Client, matte: np.ndarray) -> None:
    """rembg's README: ``curl -s -F file=@/path/to/input.jpg http://localhost:7000/api/remove``."""
    response = rembg(client)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    rgba = np.asarray(decoded(response.content))
    assert rgba.shape == (200, 320, 4)
    assert np.array_equal(rgba[..., 3], matte)


def test_rembg_only_mask_post_process_and_background(
    client: httpx.Client, matte: np.ndarray
) -> None:
    assert rembg(client, model="isnet-general-use").status_code == 200  # checked, then ignored
    mask = decoded(rembg(client, om="true").content)
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), matte)
    hard = np.asarray(decoded(rembg(client, om="true", ppm="true").content))
    assert set(np.unique(hard)) <= {0, 255}
    red = decoded(rembg(client, params={"bgc": "255,0,0,255"}, a="true").content)
    pixels = np.asarray(red.convert("RGB")).astype(int)
    assert np.abs(pixels[matte == 0] - [255, 0, 0]).max() <= 1


@pytest.mark.parametrize(
    ("data", "params", "field"),
    [
        ({"af": "300"}, None, "af"),
        ({"om": "perhaps"}, None, "om"),
        ({}, {"bgc": "red-ish"}, "bgc"),
        ({"model": "no-such-model"}, None, "model"),
        ({"model": "-8e284"}, None, "model"),
    ],
)
def test_rembg_bad_values_are_fastapi_style_422(
    client: httpx.Client, data: dict[str, str], params: dict[str, str] | None, field: str
) -> None:
    response = rembg(client, params=params, **data)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"][1] == field


def test_rembg_without_a_file_is_422_and_get_is_405(client: httpx.Client) -> None:
    response = client.post("/api/remove", data={"om": "true"}, files={"x": ("a", b"1")})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "file"]
    assert client.get("/api/remove", params={"url": "http://example.com/a.png"}).status_code == 405


def test_drop_ins_are_in_the_contract_and_counted_per_route(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert "post" in spec["paths"]["/v1.0/removebg"]
    assert "post" in spec["paths"]["/api/remove"]
    assert spec["components"]["securitySchemes"]["XApiKey"]["name"] == "X-Api-Key"
    requests = client.get("/v1/models").json()["router"]["requests"]
    assert "/v1.0/removebg" in requests and "/api/remove" in requests
