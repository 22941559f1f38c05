"""The HTTP contract (DESIGN.md §5): `openapi/fieldsync.yaml`, served as JSON at
`/v1/openapi.json` and as a reference page at `/v1/docs`.

The YAML file is the one source: it is read once at start, converted to JSON and rendered to HTML
here, and the tests hold the server and a generated client to it (`tests/api/test_contract.py`).
The package reaches it through `fieldsync/api/openapi.yaml`, a link to `openapi/fieldsync.yaml`,
so that an installed package carries it too.
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import yaml
from aiohttp import web

from fieldsync.api._docs_page import render
from fieldsync.api._http import json_response

__all__ = ["ContractRoutes", "load_spec"]

OPENAPI_JSON = "/v1/openapi.json"
DOCS = "/v1/docs"

# The page has no script and loads nothing: everything it shows is in its own HTML and style.
_DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


# libyaml's parser when PyYAML was built with it: ten times faster than the pure Python one.
try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _Loader(_SafeLoader):
    """Safe YAML without its implicit timestamps: an unquoted date in an example would become a
    `datetime`, which JSON does not have, and the served document would differ from the file."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_spec(text: str | None = None) -> dict[str, Any]:
    """The OpenAPI document as JSON-ready data: the packaged file's, or `text`'s. Treat it as
    read-only: the packaged one is parsed once per process and shared."""
    if text is None:
        return _packaged()
    spec = yaml.load(text, Loader=_Loader)
    if not isinstance(spec, dict) or not str(spec.get("openapi", "")).startswith("3.1"):
        raise ValueError("the contract is not an OpenAPI 3.1 document")
    return spec


@functools.cache
def _packaged() -> dict[str, Any]:
    return load_spec((importlib.resources.files("fieldsync.api") / "openapi.yaml").read_text())


class ContractRoutes:
    """`GET /v1/openapi.json` and `GET /v1/docs`, both made once from the spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        self._page = render(spec)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(OPENAPI_JSON, self.openapi), web.get(DOCS, self.docs)]

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        # Through the screens' answer: an ETag (revalidation costs no body) and compression.
        return await json_response(request, self._spec)

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self._page,
            content_type="text/html",
            headers={"Content-Security-Policy": _DOCS_CSP, "X-Content-Type-Options": "nosniff"},
        )
