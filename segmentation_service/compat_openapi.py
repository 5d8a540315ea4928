"""The OpenAPI description of the drop-in endpoints (``compat.py``) and the value tables of
remove.bg's parameters: what ``/openapi.json`` publishes and the contract test checks."""

from __future__ import annotations

from typing import Any

from segmentation_service.deadlines import MAX_TIMEOUT_MS

#: rembg's server checks ``model`` against its session names with this (unanchored)
#: pattern and answers 422 when it does not match; the model is then ignored here.
REMBG_MODELS = (
    "u2net",
    "u2netp",
    "u2net_human_seg",
    "u2net_cloth_seg",
    "u2net_custom",
    "silueta",
    "isnet-general-use",
    "isnet-anime",
    "sam",
    "birefnet-general",
    "birefnet-general-lite",
    "birefnet-portrait",
    "birefnet-dis",
    "birefnet-hrsod",
    "birefnet-cod",
    "birefnet-massive",
    "bria-rmbg",
)
REMBG_MODEL_PATTERN = "(" + "|".join(REMBG_MODELS) + ")"

#: Most output pixels per ``size`` (remove.bg's table; "auto" and "full" up to 25 MP).
REMOVEBG_SIZES: dict[str, int] = {
    "preview": 250_000,
    "small": 250_000,
    "regular": 250_000,
    "medium": 1_500_000,
    "hd": 4_000_000,
    "full": 25_000_000,
    "4k": 25_000_000,
    "auto": 25_000_000,
    "50MP": 50_000_000,
}
REMOVEBG_TYPES = ("auto", "person", "product", "car", "animal", "graphic", "transportation")
REMOVEBG_TYPE_LEVELS = ("none", "1", "2", "latest")
REMOVEBG_FORMATS = ("auto", "png", "jpg", "webp", "zip")

_BINARY = {"type": "string", "format": "binary"}
_BOOL_TEXT = {"type": "string", "enum": ["true", "false"]}
_REMOVEBG_FIELDS: dict[str, Any] = {
    "image_file_b64": {
        "type": "string",
        "description": "Source image file (base64-encoded string).",
    },
    "image_url": {
        "type": "string",
        "description": "Refused: this service never fetches URLs (400 invalid_image_url).",
    },
    "size": {
        "type": "string",
        "enum": list(REMOVEBG_SIZES),
        "default": "preview",
        "description": "Most output pixels: preview (0.25 MP, default, as remove.bg), medium "
        "(1.5 MP), hd (4 MP), full / auto (25 MP), 50MP; smaller images are not enlarged.",
    },
    "type": {"type": "string", "enum": list(REMOVEBG_TYPES), "default": "auto"},
    "type_level": {"type": "string", "enum": list(REMOVEBG_TYPE_LEVELS), "default": "1"},
    "format": {
        "type": "string",
        "enum": ["auto", "png", "jpg", "webp"],
        "default": "auto",
        "description": "auto: jpg on an opaque bg_color, else png.",
    },
    "bg_color": {
        "type": "string",
        "description": "Hex (81d4fa, fff, 81d4fa77 with alpha) or a colour name (green).",
    },
    "crop": {**_BOOL_TEXT, "default": "false"},
    "crop_margin": {
        "type": "string",
        "default": "0",
        "description": "30px or 10%; 1, 2 or 4 values (top, right, bottom, left).",
    },
    "channels": {"type": "string", "enum": ["rgba", "alpha"], "default": "rgba"},
}
_REMOVEBG_ERROR_SCHEMA = {
    "type": "object",
    "required": ["errors"],
    "properties": {
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": {"type": "string"},
                    "code": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        }
    },
}
_TIMEOUT_HEADER = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "description": "Answer 504 when the request is not answered within this many "
    "milliseconds of its arrival at the router.",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS},
}


def _error_responses(schema: dict[str, Any], statuses: dict[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, description in statuses.items():
        entry: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        out[str(status)] = entry
    return out


def _int_header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "integer"}}


#: The foreground's box in the result image, as remove.bg answers it: each side's name, what
#: it is. Headers ``X-Foreground-<Name>``, JSON fields ``data.foreground_<name>``.
_FOREGROUND = {
    "top": "Top edge of the foreground in the result image, in pixels from its top.",
    "left": "Left edge of the foreground in the result image, in pixels from its left.",
    "width": "Width of the foreground in the result image, in pixels.",
    "height": "Height of the foreground in the result image, in pixels.",
}
_FOREGROUND_NOTE = (
    " The foreground: the result's pixels whose matte (its alpha, on an opaque bg_color the "
    "alpha it would have) is not 0, after crop and size; absent only when scaling left none."
)


REMOVEBG_OPENAPI: dict[str, Any] = {
    "parameters": [_TIMEOUT_HEADER],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image_file": _BINARY, **_REMOVEBG_FIELDS},
                }
            },
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": _REMOVEBG_FIELDS}
            },
            "application/json": {"schema": {"type": "object", "properties": _REMOVEBG_FIELDS}},
        },
    },
    "responses": {
        "200": {
            "description": "The image without its background (the format asked for), or "
            '`{"data": {"result_b64", "foreground_top", "foreground_left", "foreground_width", '
            '"foreground_height"}}` to `Accept: application/json`.',
            "headers": {
                "X-Width": _int_header("Width of the result image."),
                "X-Height": _int_header("Height of the result image."),
                "X-Type": {
                    "description": "The type asked for, else other (the foreground is not "
                    "classified); absent with type_level=none.",
                    "schema": {"type": "string"},
                },
                "X-Credits-Charged": {
                    "description": "Always 0.",
                    "schema": {"type": "number"},
                },
                **{
                    f"X-Foreground-{name.title()}": _int_header(text + _FOREGROUND_NOTE)
                    for name, text in _FOREGROUND.items()
                },
            },
            "content": {
                "image/png": {"schema": _BINARY},
                "image/jpeg": {"schema": _BINARY},
                "image/webp": {"schema": _BINARY},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "data": {
                                "type": "object",
                                "required": ["result_b64"],
                                "properties": {
                                    "result_b64": {"type": "string"},
                                    **{
                                        f"foreground_{name}": {
                                            "type": "integer",
                                            "minimum": 0,
                                            "description": text + _FOREGROUND_NOTE,
                                        }
                                        for name, text in _FOREGROUND.items()
                                    },
                                },
                            }
                        },
                    }
                },
            },
        },
        **_error_responses(
            _REMOVEBG_ERROR_SCHEMA,
            {
                400: "Invalid parameters or input file unprocessable (remove.bg's codes: "
                "missing_source, invalid_image_url, failed_to_read_image, file_too_large, "
                "invalid_size, invalid_format, invalid_bg_color, invalid_crop_margin, "
                "unknown_foreground, ...).",
                403: "Missing or wrong API key (X-Api-Key or Authorization: Bearer).",
                408: "The body did not arrive within router.body_timeout_s.",
                429: "Busy (admission budget, queue, GPU memory): retry after Retry-After.",
                504: "X-Request-Timeout-Ms expired, or no model answer in time.",
            },
        ),
    },
}

_REMBG_ERROR_SCHEMA = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object"}},
            ]
        }
    },
}
REMBG_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "bgc",
            "in": "query",
            "required": False,
            "description": "Background colour r,g,b,a (also hex or a name).",
            "schema": {"type": "string"},
        },
        {
            "name": "extras",
            "in": "query",
            "required": False,
            "description": "Accepted and ignored (rembg's model arguments).",
            "schema": {"type": "string"},
        },
        _TIMEOUT_HEADER,
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": _BINARY,
                        "model": {
                            "type": "string",
                            "default": "u2net",
                            "pattern": REMBG_MODEL_PATTERN,
                            "description": "One of rembg's model names, checked as rembg's "
                            "server does, then ignored: RMBG-2.0 answers.",
                        },
                        "a": {
                            **_BOOL_TEXT,
                            "default": "false",
                            "description": "Alpha "
                            "matting: here, the foreground's colours estimated at edges.",
                        },
                        "af": {"type": "integer", "minimum": 0, "maximum": 255, "default": 240},
                        "ab": {"type": "integer", "minimum": 0, "maximum": 255, "default": 10},
                        "ae": {"type": "integer", "minimum": 0, "default": 10},
                        "om": {**_BOOL_TEXT, "default": "false", "description": "Only mask."},
                        "ppm": {
                            **_BOOL_TEXT,
                            "default": "false",
                            "description": "Post-process the mask to a hard one.",
                        },
                    },
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "PNG: the cutout, or the grayscale mask (om=true).",
            "content": {"image/png": {"schema": _BINARY}},
        },
        **_error_responses(
            _REMBG_ERROR_SCHEMA,
            {
                400: "The image could not be decoded.",
                401: "Missing or wrong API key (Authorization: Bearer or X-Api-Key).",
                408: "The body did not arrive within router.body_timeout_s.",
                413: "Body or image over a configured limit.",
                415: "Image format not accepted.",
                422: "A parameter has a value that is not accepted.",
                503: "Overloaded: retry after Retry-After seconds.",
                504: "X-Request-Timeout-Ms expired, or no model answer in time.",
            },
        ),
    },
}

#: The key as remove.bg's clients send it, beside the service's own Bearer scheme.
X_API_KEY_SCHEME = {
    "type": "apiKey",
    "in": "header",
    "name": "X-Api-Key",
    "description": "The API key as remove.bg's clients send it (the drop-in endpoints).",
}
