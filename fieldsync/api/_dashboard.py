"""The web dashboard at `/dashboard/`: its page, script and stylesheet, built from `web/dashboard/`
(`make dashboard`, which `make run` and `make test` do) into this package's `dashboard/` folder.

The files are static and public: what the dashboard shows, it reads with the user's token over
`/v1/sync` (the live views) and REST. The page's CSP lets it load its own script and style only
and talk only to this server, so nothing is fetched from elsewhere at run time.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping
from pathlib import Path

from aiohttp import hdrs, web

from fieldsync.api._http import rest
from fieldsync.errors import ErrorCode, FieldsyncError

__all__ = ["DashboardRoutes"]

DASHBOARD = "/dashboard/"
_TYPES: Mapping[str, str] = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DashboardRoutes:
    """Serves the built files, read once at start; `folder` defaults to the package's."""

    def __init__(self, folder: Path | None = None) -> None:
        root = folder or Path(str(importlib.resources.files("fieldsync.api") / "dashboard"))
        self._files: dict[str, tuple[bytes, str]] = {}
        for name in _TYPES:
            path = root / name
            if path.is_file():
                data = path.read_bytes()
                self._files[name] = (data, f'W/"{hashlib.sha256(data).hexdigest()[:32]}"')

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(DASHBOARD, rest(self.page)),
            web.get(DASHBOARD + "{asset}", rest(self.asset)),
        ]

    async def page(self, request: web.Request) -> web.StreamResponse:
        return self._serve(request, "index.html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["asset"]
        if name == "index.html" or name not in _TYPES:
            raise FieldsyncError(ErrorCode.NOT_FOUND, f"{name[:64]}: no such file")
        return self._serve(request, name)

    def _serve(self, request: web.Request, name: str) -> web.Response:
        found = self._files.get(name)
        if found is None:
            raise FieldsyncError(
                ErrorCode.NOT_FOUND, "the dashboard is not built: run `make dashboard`"
            )
        data, etag = found
        headers = {
            hdrs.ETAG: etag,
            hdrs.CACHE_CONTROL: "private, no-cache",
            hdrs.VARY: "Accept-Encoding",  # as every answer of this server's, for caches
            "X-Content-Type-Options": "nosniff",
        }
        if name == "index.html":
            headers["Content-Security-Policy"] = _CSP
            headers["Referrer-Policy"] = "no-referrer"
        if request.headers.get(hdrs.IF_NONE_MATCH) == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=data, content_type=_TYPES[name], charset="utf-8", headers=headers)
