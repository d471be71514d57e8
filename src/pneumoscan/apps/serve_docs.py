"""The API documentation at /docs, from files on this machine: Swagger UI's script and style sheet as the
`fastapi-offline` package ships them (no CDN), and a page and start-up script of our own with no inline
code, so the server's Content-Security-Policy of 'self' holds there too. With a token, the start-up script
sends the one typed on the main page (kept in the tab's sessionStorage) or in the box the page shows
when the OpenAPI document answers 401."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from ..io.fileio import optional_import

# path -> (package, file, content type); read once, when the app is made
ASSETS = {
    "/docs": ("pneumoscan.apps", "static/docs.html", "text/html; charset=utf-8"),
    "/static/docs.js": ("pneumoscan.apps", "static/docs.js", "text/javascript; charset=utf-8"),
    "/static/swagger-ui-bundle.js": ("fastapi_offline", "static/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/static/swagger-ui.css": ("fastapi_offline", "static/swagger-ui.css", "text/css; charset=utf-8"),
}
DOCS_PATHS = frozenset(ASSETS)


def read_assets() -> dict[str, tuple[bytes, str]]:
    """Each asset's bytes and content type; ImportError naming the extra when fastapi-offline is missing."""
    optional_import("fastapi_offline", "serve", "the API documentation page (/docs)")
    return {path: (files(package).joinpath(name).read_bytes(), kind) for path, (package, name, kind) in ASSETS.items()}


def add_docs_routes(app: Any) -> None:
    """GET /docs and its three files, each from memory; none is in the OpenAPI document."""
    from fastapi.responses import Response

    def answer_with(data: bytes, kind: str) -> Any:
        async def answer() -> Any:
            return Response(data, media_type=kind, headers={"cache-control": "no-cache"})
        return answer

    for path, (data, kind) in read_assets().items():
        app.add_api_route(path, answer_with(data, kind), methods=["GET"], include_in_schema=False)
