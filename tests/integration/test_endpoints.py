"""Every endpoint over real HTTP against the demo application (stand-in models on the CPU)."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import segmentation_standins as standins
from segmentation.encoders import decode_rle
from segmentation.imaging import decode_image
from segmentation.models.rmbg20_segmentor import RMBG20Segmentor
from tests.conftest import assert_cutout, encode, product_frame
from tests.integration.conftest import MAX_BODY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rmbg() -> RMBG20Segmentor:
    """The same stand-in the demo serves, in-process: the expected answers."""
    return RMBG20Segmentor(standins.PRODUCT_RMBG, device="cpu", input_size=256)


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def assert_error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]


def test_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_lists_every_endpoint(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/remove-background",
        "/v1/segment",
        "/v1/products",
        "/v1/frames",
        "/v1/models",
        "/healthz",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_openapi_describes_bodies_answers_and_errors(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    assert {
        "SegmentationResult",
        "Instance",
        "RLEMask",
        "ProductsResult",
        "Product",
        "FramesResult",
        "FrameError",
        "ModelsInfo",
        "ErrorBody",
        "Error",
    } <= set(schemas)
    for path in ("/v1/remove-background", "/v1/segment", "/v1/products"):
        operation = paths[path]["post"]
        content = operation["requestBody"]["content"]
        for media in ("image/jpeg", "image/png", "image/webp"):
            assert content[media]["schema"] == {"type": "string", "format": "binary"}
        assert "image" in content["multipart/form-data"]["schema"]["properties"]
        names = {p["name"] for p in operation["parameters"]}
        assert "X-Request-Timeout-Ms" in names
        for status in ("400", "401", "413", "415", "422", "503", "504"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
        assert "Retry-After" in operation["responses"]["503"]["headers"]
        assert operation["security"] == [{"APIKey": []}, {}]  # the demo runs without a key
    assert "image/png" in paths["/v1/remove-background"]["post"]["responses"]["200"]["content"]
    answers = {
        "/v1/segment": "SegmentationResult",
        "/v1/products": "ProductsResult",
        "/v1/frames": "FramesResult",
    }
    for path, name in answers.items():
        ok = paths[path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{name}"}
    frames = paths["/v1/frames"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert frames["schema"]["properties"]["frames"]["type"] == "array"
    assert spec["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"


def test_a_wrong_method_is_405_with_allow(client: httpx.Client) -> None:
    response = client.get("/v1/segment")
    assert_error(response, 405, "method_not_allowed", "Method Not Allowed")
    assert response.headers["Allow"] == "POST"
    assert client.delete("/healthz").headers["Allow"] == "GET"


def test_models_report_stand_ins_precision_and_batching(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"rmbg-2.0", "yolo11-seg"}
    for info in models.values():
        assert info["stand_in"] is True
        assert info["precision"] == "fp32" and "cpu" in info["precision_reason"]
        assert info["replicas"] == 1
        assert info["batch"]["max_batch_size"] >= 1
        assert set(info["gpu_memory"]) >= {"allocated_bytes", "reserved_bytes", "peak_bytes"}
    assert models["rmbg-2.0"]["source"] == standins.PRODUCT_RMBG
    # Batches run padded to these sizes, each run once at start-up (demo: max 4 and 8).
    assert models["rmbg-2.0"]["batch"]["batch_sizes"] == [1, 2, 4]
    assert models["yolo11-seg"]["batch"]["batch_sizes"] == [1, 2, 4, 8]


def test_remove_background_rgba_matches_the_model(
    client: httpx.Client, rmbg: RMBG20Segmentor
) -> None:
    frame = product_frame(320, 200, seed=11)
    response = client.post(
        "/v1/remove-background",
        content=encode(frame, "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    rgba = png_array(response.content)
    assert rgba.shape == (200, 320, 4)
    assert_cutout(rgba, frame)
    expected = rmbg.predict([frame])[0]
    assert np.abs(rgba[..., 3].astype(int) - expected.astype(int)).max() <= 2


def test_remove_background_mask_from_multipart(client: httpx.Client, rmbg: RMBG20Segmentor) -> None:
    frame = product_frame(150, 100, seed=12)
    data = encode(frame, "JPEG", quality=95)
    response = client.post(
        "/v1/remove-background",
        params={"output": "mask"},
        files={"image": ("f.jpg", data, "image/jpeg")},
    )
    assert response.status_code == 200
    mask = Image.open(io.BytesIO(response.content))
    assert mask.mode == "L" and mask.size == (150, 100)
    expected = rmbg.predict([decode_image(data)])[0]
    assert np.abs(np.asarray(mask).astype(int) - expected.astype(int)).max() <= 2


def test_segment_returns_instances_with_rle_masks(client: httpx.Client) -> None:
    # The stand-in scores every object alike, so which of the tied boxes NMS keeps depends on
    # float rounding: check each instance's consistency rather than equality with a rerun.
    frame = product_frame(400, 300, seed=13)
    response = client.post(
        "/v1/segment",
        content=encode(frame, "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["width"], body["height"]) == (400, 300)
    assert body["model"] == standins.PRODUCT_YOLO
    assert 0 < len(body["instances"]) <= 300
    for inst in body["instances"]:
        assert inst["class_name"] == "box" and inst["class_id"] == 1  # a red ellipse
        assert 0.25 <= inst["score"] <= 1.0
        x1, y1, x2, y2 = inst["box"]
        assert 0 <= x1 < x2 <= 400 and 0 <= y1 < y2 <= 300
        mask = decode_rle(inst["mask"])
        assert mask.shape == (300, 400) and inst["mask"]["size"] == [300, 400]
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert xs.min() >= int(x1) and xs.max() < np.ceil(x2) + 1
        assert ys.min() >= int(y1) and ys.max() < np.ceil(y2) + 1


@pytest.mark.parametrize(
    ("params", "check"),
    [
        ({"max_det": 1}, lambda n: n == 1),
        ({"classes": "0,2"}, lambda n: n == 0),  # bottles and shoes: the frame has neither
        ({"classes": "1"}, lambda n: n > 0),  # the frame's ellipse is a box (1)
        ({"conf": 0.99}, lambda n: n == 0),
    ],
)
def test_segment_thresholds(client: httpx.Client, params: dict[str, Any], check: Any) -> None:
    response = client.post(
        "/v1/segment",
        params=params,
        content=encode(product_frame(), "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200
    assert check(len(response.json()["instances"]))


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"conf": 2}, "conf"),
        ({"iou": -1}, "iou"),
        ({"max_det": 0}, "max_det"),
        ({"classes": "person"}, "comma-separated integers"),
        ({"classes": "-1"}, "class ids between 0 and"),
        # past Ultralytics' NMS integer range: once an overflow that re-ran the batch per frame
        ({"classes": "100000000000000000000"}, "class ids between 0 and"),
        ({"classes": "1,5,7"}, "5, 7 not among this model's 4 classes"),
        ({"max_det": 1000}, "router.max_det"),
    ],
)
def test_segment_rejects_bad_parameters(client: httpx.Client, params: dict, fragment: str) -> None:
    response = client.post(
        "/v1/segment",
        params=params,
        content=encode(product_frame(), "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert_error(response, 422, "invalid_request", fragment)


def test_products_cut_out_each_detected_object(client: httpx.Client, rmbg: RMBG20Segmentor) -> None:
    frame = product_frame(480, 320, seed=14)
    response = client.post(
        "/v1/products",
        params={"max_det": 3, "margin": 0.05},
        content=encode(frame, "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["width"], body["height"]) == (480, 320)
    assert 0 < len(body["products"]) <= 3
    for product in body["products"]:
        left, top, right, bottom = product["crop_box"]
        cutout = png_array(base64.b64decode(product["cutout"]))
        assert cutout.shape == (bottom - top, right - left, 4)
        crop = frame[top:bottom, left:right]
        assert_cutout(cutout, crop)
        expected = rmbg.predict([np.ascontiguousarray(crop)])[0]
        assert np.abs(cutout[..., 3].astype(int) - expected.astype(int)).max() <= 2
        x1, y1, x2, y2 = product["box"]
        assert left <= x1 and top <= y1 and right >= int(x2) and bottom >= int(y2)


def test_frames_keep_order_and_isolate_a_bad_frame(client: httpx.Client) -> None:
    frames = [product_frame(200, 120, seed=s) for s in (21, 22, 23)]
    files = [
        ("frames", ("0.png", encode(frames[0], "PNG"), "image/png")),
        ("frames", ("1.png", b"not an image at all", "image/png")),
        ("frames", ("2.png", encode(frames[2], "PNG"), "image/png")),
        ("frames", ("3.png", encode(frames[1], "PNG"), "image/png")),
    ]
    response = client.post("/v1/frames", params={"task": "remove-background"}, files=files)
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 4 and body["failed"] == 1
    assert [e["index"] for e in body["frames"]] == [0, 1, 2, 3]
    assert body["frames"][1]["error"]["code"] == "invalid_image"
    answered = [body["frames"][i] for i in (0, 2, 3)]
    for entry, frame in zip(answered, [frames[0], frames[2], frames[1]], strict=True):
        rgba = png_array(base64.b64decode(entry["image"]))
        assert_cutout(rgba, frame)


def test_frames_segment_task(client: httpx.Client) -> None:
    files = [
        ("frames", (f"{i}.png", encode(product_frame(160, 90, seed=i), "PNG"), "image/png"))
        for i in range(3)
    ]
    response = client.post("/v1/frames", params={"task": "segment", "max_det": 2}, files=files)
    body = response.json()
    assert response.status_code == 200 and body["failed"] == 0
    assert all((e["width"], e["height"]) == (160, 90) for e in body["frames"])
    assert all(0 < len(e["instances"]) <= 2 for e in body["frames"])


def test_frames_needs_multipart(client: httpx.Client) -> None:
    response = client.post(
        "/v1/frames", content=encode(product_frame(), "PNG"), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "invalid_request", "multipart/form-data")


def test_frames_without_frames_field(client: httpx.Client) -> None:
    response = client.post("/v1/frames", files={"image": ("a.png", encode(product_frame(), "PNG"))})
    assert_error(response, 422, "invalid_request", "'frames'")


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "fragment"),
    [
        (b"", "image/png", 400, "invalid_image", "empty body"),
        (b"garbage bytes", "image/jpeg", 400, "invalid_image", "not a recognised image"),
        (encode(product_frame(), "JPEG")[:300], "image/jpeg", 400, "invalid_image", "truncated"),
        (b"hello", "text/plain", 415, "unsupported_media_type", "text/plain"),
        (_gif(), "image/gif", 415, "unsupported_media_type", "GIF"),
        (b"\0" * (MAX_BODY + 1), "image/png", 413, "payload_too_large", "over the limit"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/remove-background", "/v1/segment", "/v1/products"])
def test_bad_input_gets_a_clear_4xx(
    client: httpx.Client,
    path: str,
    body: bytes,
    content_type: str,
    status: int,
    code: str,
    fragment: str,
) -> None:
    response = client.post(path, content=body, headers={"Content-Type": content_type})
    assert_error(response, status, code, fragment)


def test_unknown_route_is_a_json_404(client: httpx.Client) -> None:
    assert_error(client.get("/v2/nothing"), 404, "not_found", "Not Found")


def test_service_still_healthy_after_bad_input(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/v1/remove-background", content=b"junk", headers={"Content-Type": "image/png"})
    response = client.post(
        "/v1/remove-background",
        content=encode(product_frame(), "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200


def _router(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/models")
    assert response.status_code == 200
    router: dict[str, Any] = response.json()["router"]
    return router


def test_router_reports_requests_per_route_template(client: httpx.Client) -> None:
    before = _router(client)["requests"]
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    for _ in range(2):
        response = client.post(
            "/v1/segment",
            params={"max_det": 1},
            content=encode(product_frame(64, 48), "PNG"),
            headers={"Content-Type": "image/png"},
        )
        assert response.status_code == 200
    assert client.get("/v1/segment").status_code == 405  # its route, not "unmatched"
    assert client.get("/no/such/path").status_code == 404
    after = _router(client)["requests"]

    def sent(key: str) -> int:
        return int(after.get(key, {}).get("count", 0) - before.get(key, {}).get("count", 0))

    assert sent("/healthz") == 3
    assert sent("/v1/segment") == 3
    assert sent("unmatched") == 1
    assert sent("/v1/models") == 1  # the first /v1/models call, counted once it answered
    assert not any(key.startswith("/no/") for key in after)


def test_random_unknown_paths_share_one_entry(client: httpx.Client) -> None:
    before = _router(client)["requests"]
    rng = np.random.default_rng(5)
    for _ in range(300):
        path = "/" + "/".join(rng.choice(list("abcdefgh"), size=12).tolist())
        assert client.get(path).status_code == 404
    after = _router(client)["requests"]
    assert after["unmatched"]["count"] - before.get("unmatched", {}).get("count", 0) == 300
    assert set(after) - set(before) <= {"unmatched", "/v1/models"}


def test_the_router_process_does_not_import_torch(client: httpx.Client) -> None:
    router = _router(client)
    assert router["torch_imported"] is False
    assert router["pid"] not in {m["pid"] for m in client.get("/v1/models").json()["models"]}


def test_frames_over_the_per_request_limit_are_413_naming_it(client: httpx.Client) -> None:
    files = [("frames", (f"{i}.png", b"x", "image/png")) for i in range(257)]
    response = client.post("/v1/frames", files=files)
    assert_error(response, 413, "payload_too_large", "max_frames_per_request=256")


def test_replicas_report_time_per_model_step(client: httpx.Client) -> None:
    files = [
        ("frames", (f"{i}.png", encode(product_frame(96, 64, seed=70 + i), "PNG"), "image/png"))
        for i in range(20)  # more than one call's worth (frames_per_call 16)
    ]
    body = client.post("/v1/frames", params={"task": "segment"}, files=files).json()
    assert body["count"] == 20 and body["failed"] == 0
    for model in client.get("/v1/models").json()["models"]:
        stages = model["stages"]
        for step in ("model", "model:preprocess", "model:forward", "model:postprocess"):
            assert stages[step]["count"] >= 1 and stages[step]["mean_ms"] > 0, (model, step)
