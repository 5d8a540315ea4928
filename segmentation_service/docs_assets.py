"""``/docs`` and ``/redoc`` served with no request leaving the host.

FastAPI's own pages load Swagger UI's script and styles from a CDN (and ReDoc's script, Google
fonts and a favicon from other hosts): on a machine without internet ``/docs`` was a blank
page. The same pages are built here with FastAPI's ``get_swagger_ui_html`` and
``get_redoc_html``, pointed at the Swagger UI 5 and ReDoc 2 builds that the pinned
``fastapi-offline`` package ships, which the router serves under :data:`ASSETS_PATH`.

The pages keep their paths (``/docs``, ``/docs/oauth2-redirect``, ``/redoc``), so the router's
check that puts them behind the API key applies unchanged. The assets themselves need no key:
they are the published Swagger UI and ReDoc builds and say nothing about this API.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the Swagger UI and ReDoc files are served, inside the application.
ASSETS_PATH = "/docs-assets"
#: The files each page loads, relative to :data:`ASSETS_PATH`.
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = (
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "redoc.standalone.js",
    "favicon.png",
)
#: Swagger UI would otherwise send the schema's URL to an online validator for a badge.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
#: What the pages may load: only this host. ReDoc 2 shows its maker's logo from its CDN
#: whatever its options say; under this policy the browser never asks for it (ReDoc then
#: hides the image). Both pages start from an inline script and inject inline styles, and
#: ReDoc's search runs in a worker made from a blob.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "frame-ancestors 'self'",
    )
)


def assets_dir() -> Path:
    """The folder of Swagger UI and ReDoc files installed with ``fastapi-offline``."""
    folder = Path(str(files("fastapi_offline") / "static"))
    missing = [
        name
        for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON)
        if not (folder / name).is_file()
    ]
    if missing:
        raise RuntimeError(
            f"fastapi-offline at {folder} lacks {missing}: install the version pinned in "
            "pyproject.toml"
        )
    return folder


def same_host_only(page: HTMLResponse) -> HTMLResponse:
    """``page`` with :data:`CONTENT_SECURITY_POLICY`."""
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def serve_docs_offline(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add ``docs_url``, its OAuth2 redirect and ``redoc_url`` to ``app``, created with
    ``docs_url=None, redoc_url=None``, with their assets served by ``app`` itself."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None, redoc_url=None: its pages use CDNs")
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the docs pages need the app's openapi_url")
    oauth2_redirect_url = f"{docs_url}/oauth2-redirect"
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_dir()), name="docs-assets")

    def prefix(request: Request) -> str:
        """The application's route prefix (Serve's ``route_prefix``), to address its own
        files from the browser."""
        root: str = request.scope.get("root_path", "")
        return root.rstrip("/")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return same_host_only(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{ASSETS_PATH}/{SWAGGER_JS}",
                swagger_css_url=f"{root}{ASSETS_PATH}/{SWAGGER_CSS}",
                swagger_favicon_url=f"{root}{ASSETS_PATH}/{FAVICON}",
                oauth2_redirect_url=root + oauth2_redirect_url,
                init_oauth=app.swagger_ui_init_oauth,
                swagger_ui_parameters={
                    **SWAGGER_UI_PARAMETERS,
                    **(app.swagger_ui_parameters or {}),
                },
            )
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return same_host_only(
            get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_PATH}/{REDOC_JS}",
                redoc_favicon_url=f"{root}{ASSETS_PATH}/{FAVICON}",
                with_google_fonts=False,
            )
        )
