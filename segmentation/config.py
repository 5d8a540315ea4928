"""Settings of the segmentation library, read from the environment in one place.

``load_settings()`` is the only function that looks at ``os.environ``; everything else
receives a validated :class:`Settings` object. Nothing is read at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

TRUE_SPELLINGS = ("1", "true", "yes", "enable")
FALSE_SPELLINGS = ("0", "false", "no", "disable")

#: RMBG-2.0 on the Hugging Face hub (gated, non-commercial licence).
DEFAULT_RMBG_MODEL = "briaai/RMBG-2.0"
DEFAULT_YOLO_MODEL = "yolo11m-seg.pt"

#: Lower-precision formats of RMBG-2.0's transformer linear layers (segmentation/quantize.py).
LinearFormat = Literal["fp8", "int8"]
#: What ``RMBG_COMPILE`` compiles of RMBG-2.0's fast path: its Swin blocks, its decoder.
CompilePart = Literal["blocks", "decoder"]
COMPILE_PARTS: tuple[CompilePart, ...] = ("blocks", "decoder")


def parse_bool(value: str) -> bool:
    """Parse a boolean setting: ``1 true yes enable`` or ``0 false no disable``, any case."""
    normalized = str(value).strip().lower()
    if normalized in TRUE_SPELLINGS:
        return True
    if normalized in FALSE_SPELLINGS:
        return False
    raise ValueError(
        f"invalid boolean {value!r}: accepted values are "
        f"{', '.join(TRUE_SPELLINGS)} (true) or {', '.join(FALSE_SPELLINGS)} (false), any case"
    )


def parse_compile(value: object) -> tuple[CompilePart, ...]:
    """``RMBG_COMPILE``: a boolean (true compiles the Swin blocks, as it always has), or the
    parts to compile, ``blocks`` and/or ``decoder``, comma-separated, any case."""
    if isinstance(value, bool):
        return ("blocks",) if value else ()
    if isinstance(value, (tuple, list)):
        words = [str(word) for word in value]
    else:
        text = str(value).strip().lower()
        if text in TRUE_SPELLINGS or text in FALSE_SPELLINGS:
            return ("blocks",) if parse_bool(text) else ()
        words = text.split(",")
    parts = {word.strip().lower() for word in words}
    unknown = sorted(parts - set(COMPILE_PARTS))
    if unknown:
        raise ValueError(
            f"invalid value {value!r}: give blocks, decoder or blocks,decoder (the parts to "
            f"compile), or a boolean: {', '.join(TRUE_SPELLINGS)} (the blocks) or "
            f"{', '.join(FALSE_SPELLINGS)} (nothing), any case"
        )
    return tuple(part for part in COMPILE_PARTS if part in parts)


class Settings(BaseModel):
    """Validated settings shared by both segmentors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_fp16: bool = Field(
        True, description="Run models in FP16 where a CUDA GPU supports it (USE_FP16)."
    )
    use_fp8: bool = Field(
        False,
        description="Keep RMBG-2.0's transformer linear layers (Swin qkv, proj, MLP) in FP8, "
        "the rest in FP16; needs a CUDA GPU of compute capability 8.9+ and torchao, the model "
        "refuses to build elsewhere (USE_FP8).",
    )
    use_int8: bool = Field(
        False,
        description="Keep RMBG-2.0's transformer linear layers (Swin qkv, proj, MLP) as INT8 "
        "weights, the rest in FP16 (FP32 on a CPU); any device, needs torchao (USE_INT8).",
    )
    device: str = Field(
        "auto",
        description="Torch device for the models: 'auto' (cuda when available), 'cpu', 'cuda', "
        "'cuda:N' (DEVICE).",
    )
    rmbg_model: str = Field(
        DEFAULT_RMBG_MODEL,
        description="RMBG-2.0 source: a Hugging Face repo id or a local model directory "
        "(RMBG_MODEL).",
    )
    rmbg_revision: str | None = Field(
        None,
        description="40-hex commit of the hub repo, required for a hub id because the model runs "
        "the repository's own code; ignored for local directories (RMBG_REVISION).",
    )
    rmbg_trust_remote_code: bool = Field(
        False,
        description="Allow running the model repository's own Python code, required by RMBG-2.0 "
        "(RMBG_TRUST_REMOTE_CODE).",
    )
    rmbg_input_size: int = Field(
        1024, ge=64, le=4096, description="Square model input size in pixels (RMBG_INPUT_SIZE)."
    )
    rmbg_optimized: bool = Field(
        True,
        description="Run RMBG-2.0 through its fast inference path (fused window attention, "
        "gathered windows, leaner decoder); false runs the published eager code, the "
        "reference (RMBG_OPTIMIZED).",
    )
    rmbg_compile: tuple[CompilePart, ...] = Field(
        (),
        description="Also compile parts of RMBG-2.0's fast path with torch.compile (Inductor): "
        "'blocks' (the Swin blocks; 'true' means them), 'decoder' (the whole decoder), or "
        "'blocks,decoder'; paid for at start-up unless Inductor's on-disk cache "
        "(TORCHINDUCTOR_CACHE_DIR) or a compiled artifact (RMBG_COMPILE_CACHE) holds them; "
        "needs RMBG_OPTIMIZED (RMBG_COMPILE).",
    )
    rmbg_compile_cache: str | None = Field(
        None,
        description="A directory of compiled artifacts for RMBG_COMPILE "
        "(segmentation.compile_cache): a replica whose artifact is there compiles from it; "
        "one whose artifact is missing runs the fast path uncompiled and says so in "
        "/v1/models (RMBG_COMPILE_CACHE).",
    )
    yolo_model: str = Field(
        DEFAULT_YOLO_MODEL,
        description="Ultralytics weights: a .pt file, a model name, or a .yaml architecture "
        "(random weights) (YOLO_MODEL).",
    )
    yolo_imgsz: int = Field(
        640, ge=32, le=4096, description="YOLO inference size in pixels (YOLO_IMGSZ)."
    )
    hf_token: str | None = Field(
        None, description="Hugging Face token for the gated RMBG-2.0 repo (HF_TOKEN).", repr=False
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        head, _, index = value.partition(":")
        if head not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @property
    def linear_format(self) -> LinearFormat | None:
        """The format of RMBG-2.0's transformer linear layers: ``fp8``, ``int8`` or None."""
        if self.use_fp8:
            return "fp8"
        return "int8" if self.use_int8 else None

    @model_validator(mode="after")
    def _one_linear_format(self) -> Settings:
        if self.use_fp8 and self.use_int8:
            raise ValueError(
                "USE_FP8 and USE_INT8 are both set: choose one (USE_FP8 needs a GPU of compute "
                "capability 8.9 or newer, USE_INT8 runs on any device) and unset the other"
            )
        return self

    @field_validator("rmbg_compile", mode="before")
    @classmethod
    def _parse_compile(cls, value: object) -> tuple[CompilePart, ...]:
        return parse_compile(value)

    @model_validator(mode="after")
    def _compile_needs_fast_path(self) -> Settings:
        if self.rmbg_compile and not self.rmbg_optimized:
            raise ValueError(
                f"RMBG_COMPILE={','.join(self.rmbg_compile)} compiles the fast path, which "
                "RMBG_OPTIMIZED=false turns off: set RMBG_OPTIMIZED=true or RMBG_COMPILE=false"
            )
        return self

    @field_validator("yolo_imgsz")
    @classmethod
    def _check_stride(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32 (the YOLO stride)")
        return value


#: Environment variable -> settings field. ``.env.example`` and the README document each one.
ENV_VARS: dict[str, str] = {
    "USE_FP16": "use_fp16",
    "USE_FP8": "use_fp8",
    "USE_INT8": "use_int8",
    "DEVICE": "device",
    "RMBG_MODEL": "rmbg_model",
    "RMBG_REVISION": "rmbg_revision",
    "RMBG_TRUST_REMOTE_CODE": "rmbg_trust_remote_code",
    "RMBG_INPUT_SIZE": "rmbg_input_size",
    "RMBG_OPTIMIZED": "rmbg_optimized",
    "RMBG_COMPILE": "rmbg_compile",
    "RMBG_COMPILE_CACHE": "rmbg_compile_cache",
    "YOLO_MODEL": "yolo_model",
    "YOLO_IMGSZ": "yolo_imgsz",
    "HF_TOKEN": "hf_token",
}
_BOOL_FIELDS = {
    "use_fp16",
    "use_fp8",
    "use_int8",
    "rmbg_trust_remote_code",
    "rmbg_optimized",
}


class SettingsError(ValueError):
    """A setting has a value that is not accepted; the message names the variable."""


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read the environment once and return validated settings.

    ``overrides`` (field names) win over the environment; deployments pass their
    per-application arguments this way.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var, field in ENV_VARS.items():
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        if field in _BOOL_FIELDS:
            try:
                values[field] = parse_bool(raw)
            except ValueError as exc:
                raise SettingsError(f"{var}: {exc}") from None
        else:
            values[field] = raw.strip()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        field_to_var = {f: v for v, f in ENV_VARS.items()}
        problems = "; ".join(
            f"{field_to_var.get(str(err['loc'][0]), err['loc'][0])}: "
            f"{str(err['msg']).removeprefix('Value error, ')}"
            if err["loc"]
            else str(err["msg"]).removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
