"""``build_app``: the application builder that ``serve_config.yaml`` points at."""

from __future__ import annotations

from typing import Any, cast

from pydantic import ValidationError
from ray.serve import Application, Deployment

from segmentation_service.config import AppArgs
from segmentation_service.grpc_ingress import IngressRouter
from segmentation_service.segmentors import RMBGDeployment, YoloDeployment


class AppConfigError(ValueError):
    """The application's arguments are invalid; the message names each bad setting."""


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate ``args`` and bind both segmentors and the router into one application; the
    router is its ingress for HTTP and, where ``grpc_options`` lists the servicer, gRPC."""
    try:
        app_args = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"args.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise AppConfigError(f"invalid product-segmentor arguments: {problems}") from None
    # serve.deployment turns each class into a Deployment; mypy still sees the class.
    rmbg = cast(Deployment, RMBGDeployment).bind(app_args.rmbg.model_dump())
    yolo = cast(Deployment, YoloDeployment).bind(app_args.yolo.model_dump())
    return IngressRouter.bind(rmbg, yolo, app_args.router.model_dump())
