"""The HTTP API's answers as pydantic models: the router returns them and ``/openapi.json``
publishes them as named schemas, so the contract test checks every answer against them.

Models the service owns in full forbid extra fields (an answer with a field the schema does not
name fails the contract test); the per-model entry of ``/v1/models`` stays open, since each
replica reports what its model knows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_Closed):
    """What went wrong, in a stable code and words a caller can act on."""

    code: str = Field(description="Stable error code, e.g. invalid_image, overloaded.")
    message: str = Field(description="What was wrong and what is accepted.")


class ErrorBody(_Closed):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: Error


class RLEMask(_Closed):
    """A binary mask in COCO run-length encoding (pycocotools' compressed string form)."""

    size: Annotated[list[int], Field(min_length=2, max_length=2)] = Field(
        description="[height, width] of the frame."
    )
    counts: str = Field(description="COCO compressed RLE counts.")


Box = Annotated[
    list[float],
    Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in frame pixels."),
]


class Instance(_Closed):
    """One detected object."""

    box: Box
    score: float = Field(ge=0.0, le=1.0)
    class_id: int = Field(ge=0)
    class_name: str
    mask: RLEMask


class SegmentationResult(_Closed):
    """The instances of one frame, masks at the frame's own size."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    model: str = Field(description="Source of the YOLO model that answered.")
    instances: list[Instance]


class Product(_Closed):
    """One detected object cut out of its crop by RMBG-2.0."""

    box: Box
    score: float = Field(ge=0.0, le=1.0)
    class_id: int = Field(ge=0)
    class_name: str
    crop_box: Annotated[list[int], Field(min_length=4, max_length=4)] = Field(
        description="[left, top, right, bottom] of the crop (box plus margin) in frame pixels."
    )
    cutout: str = Field(
        description="Base64 image of the crop: an RGBA PNG with a transparent background, "
        "unless the cutout options asked otherwise (media_type)."
    )
    media_type: str = Field(default="image/png", description="The cutout's image type.")
    cutout_box: Annotated[list[int], Field(min_length=4, max_length=4)] = Field(
        description="[left, top, right, bottom] in frame pixels that the cutout image covers: "
        "crop_box, or with crop=true the subject found in it plus crop_margin (may reach past "
        "the frame's edge; the whole crop when the matte is empty)."
    )


class ProductsResult(_Closed):
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    products: list[Product]


class FrameCutout(_Closed):
    """A frame of ``task=remove-background``: its encoded image, base64."""

    index: int = Field(ge=0, description="Position of the frame in the request.")
    content_type: Literal["image/png", "image/webp", "image/jpeg"] = Field(
        default="image/png", description="The image's type: PNG unless `format` asked otherwise."
    )
    image: str = Field(
        description="Base64 image: the cutout (RGBA, or RGB on an opaque background) or the "
        "grayscale matte (output=mask), as the cutout options asked."
    )
    width: int = Field(ge=1, description="Width of the image in pixels.")
    height: int = Field(ge=1, description="Height of the image in pixels.")
    cutout_box: Annotated[list[int], Field(min_length=4, max_length=4)] | None = Field(
        default=None,
        description="With crop=true: the frame pixels the image covers, [left, top, right, "
        "bottom] (the subject plus crop_margin; may reach past the frame's edge).",
    )


class FrameSegmentation(SegmentationResult):
    """A frame of ``task=segment``."""

    index: int = Field(ge=0, description="Position of the frame in the request.")


class FrameError(_Closed):
    """A frame that failed on its own; the other frames of the request are still answered."""

    index: int = Field(ge=0, description="Position of the frame in the request.")
    error: Error


class FramesResult(_Closed):
    """Many frames' results, in input order."""

    task: Literal["remove-background", "segment"]
    count: int = Field(ge=0)
    failed: int = Field(ge=0, description="Frames answered with an error entry.")
    frames: list[FrameCutout | FrameSegmentation | FrameError]


class StageTiming(_Closed):
    count: int = Field(ge=0)
    mean_ms: float = Field(ge=0.0)


class ModelStatus(BaseModel):
    """One model deployment as its replica reports it (open: replicas may add fields)."""

    model_config = ConfigDict(extra="allow")

    name: str
    source: str
    revision: str | None
    precision: str
    precision_reason: str
    device: str
    stand_in: bool = Field(
        description="A stand-in checkpoint of the project's, not the real model."
    )
    stand_in_weights: str | None = Field(
        default=None,
        description="For a stand-in: trained on synthetic product shots, or random weights.",
    )
    replicas: int | None = Field(description="Running replicas of the deployment.")
    batch: dict[str, Any]
    stages: dict[str, StageTiming]
    gpu_memory: dict[str, Any]


class RouterStatus(_Closed):
    """The router replica that answered."""

    pid: int
    torch_imported: bool = Field(
        description="Whether this router process imported torch (it should not: it reads "
        "requests and image headers; the model replicas decode and encode)."
    )
    requests: dict[str, StageTiming] = Field(
        description="Requests per route template ('unmatched' for unknown paths) and codec "
        "calls per function, with their mean time."
    )
    in_flight_frames: int = Field(ge=0)
    max_inflight_frames: int = Field(ge=1)
    in_flight_pixels: int = Field(0, ge=0, description="Decoded pixels of admitted frames.")
    max_inflight_pixels: int = Field(1, ge=1)
    body_bytes_held: int = Field(0, ge=0, description="Request body bytes held now.")
    rejected: int = Field(ge=0, description="Requests refused with 503 by admission.")


class ModelsInfo(_Closed):
    models: list[ModelStatus]
    router: RouterStatus


class Health(_Closed):
    status: Literal["ok"]
