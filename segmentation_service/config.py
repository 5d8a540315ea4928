"""Arguments of the Serve application, validated once when it is built or reconfigured."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segmentation.imaging import DEFAULT_MAX_PIXELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchConfig(_Strict):
    """A segmentor deployment's ``user_config``: changes apply live, without a restart."""

    max_batch_size: int = Field(8, ge=1, le=256, description="Most frames in one model call.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=5.0, description="Longest wait for a batch to fill, in seconds."
    )
    oom_recover_after: int = Field(
        50, ge=1, description="Successful batches at the cap before it grows by one after an OOM."
    )


class SegmentorArgs(_Strict):
    """Model arguments of one segmentor deployment; unset fields come from the environment."""

    model: str | None = Field(None, description="Model source (RMBG_MODEL / YOLO_MODEL).")
    revision: str | None = Field(None, description="Pinned hub commit (RMBG_REVISION).")
    trust_remote_code: bool | None = Field(
        None, description="Allow the model repository's own code (RMBG_TRUST_REMOTE_CODE)."
    )
    use_fp16: bool | None = Field(None, description="FP16 on GPUs that support it (USE_FP16).")
    use_fp8: bool | None = Field(
        None,
        description="RMBG-2.0's transformer linear layers in FP8 (USE_FP8; compute capability "
        "8.9+). Setting use_fp8 or use_int8 here decides both for this deployment.",
    )
    use_int8: bool | None = Field(
        None, description="RMBG-2.0's transformer linear layers with INT8 weights (USE_INT8)."
    )
    device: str | None = Field(None, description="'auto', 'cpu', 'cuda' or 'cuda:N' (DEVICE).")
    input_size: int | None = Field(
        None, ge=32, le=4096, description="Model input size (RMBG_INPUT_SIZE / YOLO_IMGSZ)."
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="'dummy' keeps random weights: benchmarks only."
    )
    warmup_size: tuple[int, int] = Field(
        (1080, 1920), description="(height, width) of the frames used to warm up at start-up."
    )
    cuda_graphs: bool | None = Field(
        None,
        description="On a GPU, replay CUDA graphs of the model at each batch size (one launch "
        "per batch instead of hundreds). None: on for YOLO (for frames of warmup_size; other "
        "sizes run eagerly), off for RMBG-2.0, whose capture needs more memory than half an "
        "H100 (measured: out of memory at batch 16 in a 0.5 share). A capture that fails "
        "falls back to eager runs and is reported in /v1/models. Ignored on CPU.",
    )
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Share of the GPU this replica may allocate; default its num_gpus share.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Largest decoded image, in pixels (413 above)."
    )
    max_queued_frames: int = Field(
        1024,
        ge=1,
        description="Frames waiting for the GPU in one replica; beyond it, 503 with Retry-After.",
    )
    device_jpeg_decode: bool = Field(
        True,
        description="On a GPU, decode plain JPEGs (RGB or grayscale, no EXIF rotation) with "
        "nvJPEG on the device as their batch runs; other images are decoded on this "
        "replica's codec threads.",
    )
    decode_ahead: bool = Field(
        False,
        description="With device JPEG decoding: decode the next batch's JPEGs on a thread and "
        "CUDA stream of their own while the current batch runs the model, instead of first "
        "thing in each batch on the GPU thread (holds one more batch of decoded frames on "
        "the device).",
    )
    max_host_pixels: int = Field(
        400_000_000,
        ge=1,
        description="Pixels of images decoded on this replica's CPU (not nvJPEG) that it holds "
        "at once, queued or running (3 bytes each: 400 M is 1.2 GB, ~190 1080p frames); "
        "beyond it, 503 with Retry-After. At least max_pixels.",
    )
    fault_oom_above_batch: int | None = Field(
        None,
        ge=1,
        description="Resilience testing only: model calls on more frames than this raise a CUDA "
        "out-of-memory error, as a full card would. Never set in production.",
    )
    fault_fail_frame_value: int | None = Field(
        None,
        ge=0,
        le=255,
        description="Resilience testing only: a model call holding a frame whose every pixel "
        "has this value raises ValueError, as a model that cannot take that frame would. "
        "Never set in production.",
    )

    @model_validator(mode="after")
    def _one_image_fits(self) -> SegmentorArgs:
        if self.max_host_pixels < self.max_pixels:
            raise ValueError(
                f"max_host_pixels={self.max_host_pixels} is less than max_pixels="
                f"{self.max_pixels}: an image of max_pixels could never be decoded; raise "
                "max_host_pixels or lower max_pixels"
            )
        return self

    @model_validator(mode="after")
    def _one_linear_format(self) -> SegmentorArgs:
        if self.use_fp8 and self.use_int8:
            raise ValueError("use_fp8 and use_int8 are both true: choose one")
        return self

    def model_overrides(self) -> dict[str, Any]:
        """Keyword arguments of :func:`segmentation.factory.build_segmentor`."""
        return {
            "model": self.model,
            "device": self.device,
            "use_fp16": self.use_fp16,
            "use_fp8": self.use_fp8,
            "use_int8": self.use_int8,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "input_size": self.input_size,
            "load_format": self.load_format,
        }


class RouterArgs(_Strict):
    """Limits and options of the HTTP router."""

    max_body_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 above)."
    )
    max_inflight_frames: int = Field(
        1024,
        ge=1,
        description="Frames one router replica holds at once (a /v1/frames request holds one "
        "per frame, /v1/products 1 + one per object found); beyond it, 503 with Retry-After.",
    )
    max_frames_per_request: int = Field(
        256,
        ge=1,
        le=4096,
        description="Most frames in one /v1/frames request (413 above); at most "
        "max_inflight_frames.",
    )
    max_inflight_pixels: int = Field(
        600_000_000,
        ge=1,
        description="Decoded pixels of the frames one router replica has at the models at once, "
        "counted from each image's header before anything is decoded (a 1080p frame is 2.07 M); "
        "beyond it, 503 with Retry-After.",
    )
    max_request_pixels: int = Field(
        300_000_000,
        ge=1,
        description="Decoded pixels one request may ask for (all its frames, and for "
        "/v1/products the crops too); above it, 413. At most max_inflight_pixels.",
    )
    max_products: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most objects /v1/products cuts out of one frame; when YOLO finds more, 413 "
        "before any crop is made (lower max_det or raise conf).",
    )
    max_det: int = Field(
        300,
        ge=1,
        le=1000,
        description="Highest max_det a request may ask for (each instance is a mask to compute "
        "and encode); above it, 422.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Longest time to receive a request's body; past it, 408. A stalled upload "
        "holds no admission (requests are admitted once their body is read) and no longer "
        "than this.",
    )
    max_inflight_body_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024,
        description="Request body bytes one router replica holds at once (being read or "
        "waiting for their models); beyond it, 503 with Retry-After. At least max_body_bytes.",
    )
    model_call_timeout_s: float = Field(
        300.0,
        gt=0.0,
        le=3600.0,
        description="Longest wait for one model call when the request set no shorter deadline "
        "(X-Request-Timeout-Ms); past it, 504: a stuck replica cannot hold a request forever.",
    )
    frames_per_call: int = Field(
        16,
        ge=1,
        le=256,
        description="Frames of a /v1/frames request sent to a model replica in one call (its "
        "interpreter handles one call where it would handle this many).",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of an environment variable holding the API key: requests then need "
        "'Authorization: Bearer <key>' (HTTP header or gRPC metadata), /docs and /openapi.json "
        "too. A router replica whose node lacks the variable, or has it empty, refuses to "
        "start. None (the default): no authentication.",
    )
    public_docs: bool = Field(
        False,
        description="With api_key_env set, let /docs, /redoc and /openapi.json answer without "
        "the key (they describe the API, not its data). Without a key they are always open.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Largest decoded image, in pixels (413 above)."
    )
    product_margin: float = Field(
        0.1, ge=0.0, le=1.0, description="Margin added around each product box before RMBG."
    )

    @model_validator(mode="after")
    def _requests_fit_the_budget(self) -> RouterArgs:
        for part, whole in (
            ("max_frames_per_request", "max_inflight_frames"),
            ("max_request_pixels", "max_inflight_pixels"),
            ("max_pixels", "max_request_pixels"),
            ("max_body_bytes", "max_inflight_body_bytes"),
        ):
            if getattr(self, part) > getattr(self, whole):
                raise ValueError(
                    f"{part}={getattr(self, part)} is more than {whole}={getattr(self, whole)}: "
                    f"a request that large could never be admitted; lower {part} or raise {whole}"
                )
        return self


class AppArgs(_Strict):
    """Arguments of ``build_app``: one application with both segmentors and the router."""

    rmbg: SegmentorArgs = Field(default_factory=SegmentorArgs)
    yolo: SegmentorArgs = Field(default_factory=SegmentorArgs)
    router: RouterArgs = Field(default_factory=RouterArgs)

    @field_validator("yolo")
    @classmethod
    def _yolo_stride(cls, yolo: SegmentorArgs) -> SegmentorArgs:
        if yolo.input_size is not None and yolo.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {yolo.input_size}")
        return yolo
