"""What every HTTP request passes through before its handler, WebSocket upgrades included:

- a route without a declared permission is refused (fail closed, see `_permissions`), and a
  route that needs a token gets its principal verified here, the one place HTTP authenticates;
- a request to a WebSocket route that is not a valid upgrade gets 400 `protocol_error`;
- a browser WebSocket from an origin not allowed is refused before the upgrade;
- an app below its platform's minimum version gets 426 `client_upgrade_required`;
- a path scheduled for removal answers with `Deprecation` and `Sunset` headers.

Each check answers with an RFC 9457 problem before the handler runs, so a refused WebSocket is
never upgraded. The checks run in one middleware: a WebSocket's handler runs for as long as its
socket, and every middleware's frame stays in memory with it (S4, bench/README.md).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC
from email.utils import format_datetime
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_response import StreamResponse

from fieldsync import logs
from fieldsync.api._permissions import PRINCIPAL, Permission, permission_of
from fieldsync.api._problems import problem
from fieldsync.api._redaction import redact_aiohttp_logs
from fieldsync.auth import Verify, bearer_token, required_version
from fieldsync.config import Deprecation, Settings
from fieldsync.errors import AuthError, ErrorCode

__all__ = ["install"]

log = logging.getLogger(__name__)

_Prepare = Callable[[web.Request, StreamResponse], Awaitable[None]]
# A check answers a request it refuses, and returns None to let it through.
_Check = Callable[[web.Request], Awaitable[StreamResponse | None]]

CLIENT_PLATFORM = "X-Client-Platform"
CLIENT_VERSION = "X-Client-Version"


def install(app: web.Application, settings: Settings, verify: Verify) -> None:
    """Add the checks to `app` (before it starts) from the settings, and keep credentials out
    of what aiohttp logs about its requests."""
    redact_aiohttp_logs()
    # The first runs first. The version gate comes before authentication: an old app whose token
    # has expired must hear "upgrade", since signing in again would not let it in.
    app.middlewares.append(
        _checks(
            _request_context,
            _client_version_gate(settings.min_client_versions, settings.upgrade_urls),
            _origin_allow_list(settings.allowed_origins, settings.public_url),
            _authorise(verify),
        )
    )
    if settings.deprecations:
        app.on_response_prepare.append(_deprecation_headers(settings.deprecations))


def _checks(*checks: _Check) -> Middleware:
    @web.middleware
    async def checked(request: web.Request, handler: Handler) -> StreamResponse:
        for check in checks:
            refused = await check(request)
            if refused is not None:
                return refused
        return await handler(request)

    return checked


async def _request_context(request: web.Request) -> None:
    """Every log line of the request carries its id: the proxy's `X-Request-ID` when it sends
    a plausible one (so lines join up across the two), else one of our own."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
    logs.bind(request=request_id, subject=None, session=None, device=None, doc=None)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _authorise(verify: Verify) -> _Check:
    async def authorise(request: web.Request) -> StreamResponse | None:
        # Unmatched paths (404, 405) go on to aiohttp's own answer.
        if request.match_info.http_exception is not None:
            return None
        route = request.match_info.route
        permission = permission_of(route)
        if permission is None:
            log.error("%s %s declares no permission: refused", request.method, route)
            return problem(ErrorCode.FORBIDDEN, "this endpoint is not available")
        if permission is Permission.IN_BAND and not web.WebSocketResponse().can_prepare(request):
            # aiohttp would refuse it in text/plain; every HTTP error here is a problem document.
            return problem(
                ErrorCode.PROTOCOL_ERROR, "this is a WebSocket endpoint: send an upgrade (RFC 6455)"
            )
        if permission in (Permission.PUBLIC, Permission.IN_BAND, Permission.SCRAPER):
            return None
        token = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
        if token is None:
            return problem(ErrorCode.REAUTHENTICATE, "a bearer token is required")
        try:
            principal = await verify(token)
        except AuthError as exc:
            return problem(exc.code, exc.message)
        logs.bind(subject=principal.subject)  # a refusal's lines say whom too
        roles = permission.roles
        if roles is not None and not principal.roles & roles:
            return problem(ErrorCode.FORBIDDEN, "not allowed for your role")
        request[PRINCIPAL] = principal
        return None

    return authorise


def _origin_allow_list(allowed: frozenset[str], public_url: str) -> _Check:
    """Any web page may open a WebSocket to any server: the same-origin policy and CORS do not
    apply to them. The `Origin` header browsers must send (RFC 6455 §4.1, §10.2) is the server's
    only way to tell its own pages from another site's. Native clients send none and pass."""
    public = _origin_of(public_url) if public_url else None

    async def origin_allow_list(request: web.Request) -> StreamResponse | None:
        origin = request.headers.get(hdrs.ORIGIN)
        # The same test aiohttp applies before it upgrades (`WebSocketResponse._handshake`).
        upgrading = request.headers.get(hdrs.UPGRADE, "").lower().strip() == "websocket"
        if origin is None or not upgrading:
            return None
        # This server's own origin: the public URL's when one is set (behind a TLS-terminating
        # proxy the scheme seen here is not the page's), else the scheme and Host it was
        # reached by. A page cannot choose the Host its browser sends.
        own = public or _origin_of(f"{request.scheme}://{request.host}")
        seen = _origin_of(origin)
        if seen is not None and (seen in allowed or seen == own):
            return None
        log.info("WebSocket from origin %r refused", origin[:200])
        return problem(ErrorCode.FORBIDDEN, "this origin may not open WebSockets here")

    return origin_allow_list


def _origin_of(url: str) -> str | None:
    """The RFC 6454 origin of `url` as browsers serialise it (lower case, no default port), so
    that origins compare as strings: scheme and host and port, all three (§5: `http://host` is
    another origin than `https://host`). None for an opaque origin (`null`: sandboxed frames,
    files), which never matches, and for anything that is not an origin."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _client_version_gate(minimums: Mapping[str, str], upgrade_urls: Mapping[str, str]) -> _Check:
    """Apps name themselves with `X-Client-Platform` and `X-Client-Version`; one below its
    platform's minimum gets 426 with where to upgrade (DESIGN.md §6), the HTTP twin of close
    4426 on `hello`. A request that names no platform passes: operators, probes, and browsers
    that are not the web app."""

    async def client_version_gate(request: web.Request) -> StreamResponse | None:
        platform = request.headers.get(CLIENT_PLATFORM)
        if platform is None or not minimums:
            return None
        # Capped as `hello` caps it: a version is a few short numbers.
        version = request.headers.get(CLIENT_VERSION, "")[:32]
        minimum = required_version(minimums, platform, version)
        if minimum is None:
            return None
        # RFC 9110 §15.5.22 defines 426 for protocol upgrades and asks for an `Upgrade` header
        # naming one; here the app must upgrade, not the protocol, so none is named.
        return problem(
            ErrorCode.CLIENT_UPGRADE_REQUIRED,
            f"this app version is too old for {platform.strip()[:32]}: upgrade to {minimum}",
            min_version=minimum,
            upgrade_url=upgrade_urls.get(platform.strip()),
        )

    return client_version_gate


def _deprecation_headers(deprecations: Mapping[str, Deprecation]) -> _Prepare:
    """RFC 9745 `Deprecation: @<epoch seconds>` (an RFC 9651 structured-field Date: when the
    endpoint is or was deprecated) and RFC 8594 `Sunset: <HTTP-date>` (when it stops working)
    on every answer under a deprecated path prefix, the longest prefix winning."""
    headers = {
        prefix: {
            "Deprecation": f"@{int(d.since.timestamp())}",
            "Sunset": format_datetime(d.sunset.astimezone(UTC), usegmt=True),
        }
        for prefix, d in deprecations.items()
    }
    # Longest first, so /v1/old/x's own date beats /v1/old's.
    prefixes = sorted(headers, key=len, reverse=True)

    async def deprecation_headers(request: web.Request, response: StreamResponse) -> None:
        path = request.path
        for prefix in prefixes:
            # Whole segments only: /v1/old covers /v1/old/x, not /v1/older.
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                response.headers.update(headers[prefix])
                return

    return deprecation_headers
