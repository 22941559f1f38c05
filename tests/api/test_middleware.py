"""The checks every request passes: declared permissions, the client-version gate, the WebSocket
Origin allow-list, and Deprecation/Sunset headers, all against a real server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from fieldsync.api import ROUTE_PERMISSIONS, Permission, permission_of, undeclared
from fieldsync.app import BACKEND, STORE, AccessLogger, create_app
from fieldsync.auth import DevIssuer, Role
from fieldsync.config import SETTINGS, Settings
from fieldsync.errors import CloseCode
from fieldsync.records import Origin, OriginKind
from fieldsync.replication import Control
from fieldsync.storage import Write
from tests.harness import USERS, Server, running_server, work_order
from tests.wire import Wire, connect


def parsed(name: str, text: str) -> Any:
    """A setting's value as the server reads it from the environment or the TOML file."""
    return next(s for s in SETTINGS if s.name == name).parse(text)


async def get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDictProxy[str], Any]:
    """Status, headers, and the body as JSON (text when it is not; None for a 101)."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers or {}) as r:
        if r.status == 101:
            return r.status, r.headers, None
        text = await r.text()
        try:
            return r.status, r.headers, json.loads(text)
        except ValueError:
            return r.status, r.headers, text


def upgrade_headers(**extra: str) -> dict[str, str]:
    """What a browser sends to open a WebSocket (RFC 6455 §4.1), to read the server's answer to
    the handshake itself: its status, headers and, when refused, its problem document."""
    key = base64.b64encode(os.urandom(16)).decode()
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
        **extra,
    }


# --- the client-version gate ------------------------------------------------------------------

APP_STORE = "https://apps.apple.com/app/id1234567890"


@pytest.fixture
async def gated(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    async with running_server(
        tmp_path,
        issuer,
        min_client_versions=parsed("min_client_versions", "ios=2.4.0,android=2.3.1"),
        upgrade_urls=parsed("upgrade_urls", f"ios={APP_STORE}"),
    ) as server:
        yield server


@pytest.mark.parametrize(
    ("platform", "version", "minimum", "upgrade_url"),
    [
        ("ios", "2.3.9", "2.4.0", APP_STORE),
        ("ios", "2.4.0-beta", None, None),
        ("ios", "2.4.0", None, None),
        ("ios", "2.10.0", None, None),  # numbers, not strings: 10 > 4
        ("ios", "", "2.4.0", APP_STORE),  # a gated platform cannot pass by omitting its version
        ("ios", "banana", "2.4.0", APP_STORE),
        ("android", "2.3.0", "2.3.1", None),  # no upgrade URL configured for it
        ("web", "0.1.0", None, None),  # no minimum for the platform
        (None, "0.0.1", None, None),  # names no platform: operators, probes, other browsers
        (None, None, None, None),
    ],
)
async def test_every_request_below_the_minimum_gets_426(
    gated: Server,
    platform: str | None,
    version: str | None,
    minimum: str | None,
    upgrade_url: str | None,
) -> None:
    headers = {}
    if platform is not None:
        headers["X-Client-Platform"] = platform
    if version is not None:
        headers["X-Client-Version"] = version
    status, response_headers, body = await get(gated.url + "/v1/health", headers)
    if minimum is None:
        assert status == 200
        return
    assert status == 426
    assert response_headers["Content-Type"] == "application/problem+json"
    assert body["code"] == "client_upgrade_required"
    assert body["status"] == 426
    assert body["min_version"] == minimum
    assert body["upgrade_url"] == upgrade_url


async def test_the_gate_comes_before_authentication(gated: Server) -> None:
    headers = {
        "Authorization": f"Bearer {gated.token('ada')}",
        "X-Client-Platform": "android",
        "X-Client-Version": "1.0",
    }
    status, _, body = await get(gated.url + "/v1/metrics", headers)
    assert (status, body["code"]) == (426, "client_upgrade_required")
    headers["X-Client-Version"] = "2.3.1"
    assert (await get(gated.url + "/v1/metrics", headers))[0] == 200


async def test_an_old_app_is_refused_before_the_websocket_upgrade(gated: Server) -> None:
    old = {"X-Client-Platform": "ios", "X-Client-Version": "2.0.0"}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                gated.sync_url, headers={"Authorization": f"Bearer {gated.token('tina')}", **old}
            )
    assert refused.value.status == 426
    status, _, body = await get(gated.sync_url.replace("ws", "http", 1), upgrade_headers(**old))
    assert (status, body["min_version"], body["upgrade_url"]) == (426, "2.4.0", APP_STORE)
    # A current app upgrades; `hello` applies the same minimum (close 4426) to what it names.
    async with connect(gated.sync_url, gated.token("tina")) as wire:
        await wire.hello(platform="ios", version="2.4.1")


# --- the Origin allow-list for browser WebSockets ---------------------------------------------

DASHBOARD = "https://dash.example.com"


@pytest.fixture
async def guarded(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    origins = parsed("allowed_origins", f"{DASHBOARD}:443/, capacitor://localhost")
    async with running_server(tmp_path, issuer, allowed_origins=origins) as server:
        yield server


@asynccontextmanager
async def browser(url: str, origin: str | None, token: str | None = None) -> AsyncIterator[Wire]:
    """A WebSocket opened as a page at `origin` opens it: no Authorization header (browsers
    cannot set one), the token in-band."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, origin=origin) as ws:
        wire = Wire(ws)
        try:
            yield wire
        finally:
            await wire.close()


async def hello_in_band(wire: Wire, token: str) -> dict[str, Any]:
    client = {"platform": "web", "version": "1.0.0", "device_id": "browser"}
    await wire.send(Control({"type": "hello", "client": client, "token": token, "caps": []}))
    return await wire.control("welcome")


@pytest.mark.parametrize(
    "origin",
    [DASHBOARD, "HTTPS://Dash.Example.com", "capacitor://localhost", None],
    ids=["listed", "listed-case", "listed-app-webview", "native-no-origin"],
)
async def test_allowed_origins_and_native_clients_open_sockets(
    guarded: Server, origin: str | None
) -> None:
    async with browser(guarded.sync_url, origin) as wire:
        assert (await hello_in_band(wire, guarded.token("tina")))["type"] == "welcome"
    url = guarded.yws_url("wo:origin1") + f"?token={guarded.token('sam')}"
    async with browser(url, origin) as wire:
        await wire.ws.close()  # upgraded (an unlisted origin raises before this point)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://dash.example.com.evil.example",
        "http://dash.example.com",  # another scheme is another origin (RFC 6454 §5)
        "https://dash.example.com:8443",
        "null",  # sandboxed frames and files: shared by every such page anywhere
        "",
    ],
)
@pytest.mark.parametrize("path", ["/v1/sync", "/v1/yws/wo:origin2"])
async def test_other_origins_get_403_before_the_upgrade(
    guarded: Server, origin: str, path: str
) -> None:
    ws_url = guarded.url.replace("http", "ws", 1) + path + f"?token={guarded.token('sam')}"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url, origin=origin)
    assert refused.value.status == 403
    status, headers, body = await get(guarded.url + path, upgrade_headers(Origin=origin))
    assert (status, body["code"]) == (403, "forbidden")
    assert headers["Content-Type"] == "application/problem+json"


async def test_same_origin_pages_need_no_listing(server: Server) -> None:
    # The default allow-list is empty: native clients and the server's own pages only.
    async with browser(server.sync_url, server.url) as wire:
        assert (await hello_in_band(wire, server.token("tina")))["type"] == "welcome"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.sync_url, origin=DASHBOARD)
    assert refused.value.status == 403


@pytest.mark.parametrize(
    "origin", ["https://{host}", "http://{host}:1", "ftp://{host}"], ids=["https", "port", "ftp"]
)
async def test_same_origin_means_the_same_scheme_host_and_port(server: Server, origin: str) -> None:
    """RFC 6454 §5: a page at `https://host` is another origin than the server at `http://host`
    (here the server is reached over plain http)."""
    host = server.url.split("://", 1)[1]
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.sync_url, origin=origin.format(host=host))
    assert refused.value.status == 403


async def test_behind_a_proxy_the_public_url_is_the_own_origin(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """A TLS-terminating proxy forwards over http: the page's origin is the public URL's."""
    public = "https://sync.example.com"
    async with running_server(tmp_path, issuer, public_url=public) as server:
        async with browser(server.sync_url, public) as wire:
            assert (await hello_in_band(wire, server.token("tina")))["type"] == "welcome"
        for origin in ("http://sync.example.com", server.url):
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(server.sync_url, origin=origin)
            assert refused.value.status == 403, origin


async def test_the_origin_check_concerns_websockets_only(guarded: Server) -> None:
    status, _, body = await get(guarded.url + "/v1/health", {"Origin": "https://evil.example"})
    assert (status, body) == (200, {"status": "ok"})


# --- Deprecation and Sunset -------------------------------------------------------------------

SINCE = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def sunsetting(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    deprecations = parsed(
        "deprecations",
        "/v1/health=2026-01-01/2027-06-30, /v1/yws=2027-12-31T18:00:00+01:00,"
        "/v1/yws/wo:legacy=2026-02-01/2026-12-31",
    )
    async with running_server(tmp_path, issuer, deprecations=deprecations) as server:
        yield server


async def test_deprecated_paths_carry_deprecation_and_sunset(sunsetting: Server) -> None:
    status, headers, _ = await get(sunsetting.url + "/v1/health")
    assert status == 200
    # RFC 9745 §2.1: a structured-field Date, `@` and epoch seconds; RFC 8594 §3: an HTTP-date.
    assert headers["Deprecation"] == f"@{int(SINCE.timestamp())}" == "@1767225600"
    assert headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    # Errors under a prefix carry them too (here: a plain GET where a WebSocket belongs).
    status, headers, _ = await get(sunsetting.url + "/v1/yws/wo:plain")
    assert status == 400
    assert headers["Sunset"] == "Fri, 31 Dec 2027 17:00:00 GMT"


@pytest.mark.parametrize(
    ("path", "sunset"),
    [
        ("/v1/yws/wo:legacy", "Thu, 31 Dec 2026 00:00:00 GMT"),  # the longest prefix wins
        ("/v1/yws/wo:legacy2", "Fri, 31 Dec 2027 17:00:00 GMT"),  # whole segments only
    ],
)
async def test_the_longest_prefix_wins(sunsetting: Server, path: str, sunset: str) -> None:
    _, headers, _ = await get(sunsetting.url + path)
    assert headers["Sunset"] == sunset


async def test_a_deprecated_websocket_says_so_in_its_handshake(sunsetting: Server) -> None:
    url = sunsetting.url + "/v1/yws/wo:sunset1" + f"?token={sunsetting.token('sam')}"
    status, headers, _ = await get(url, upgrade_headers())
    assert status == 101
    assert headers["Sunset"] == "Fri, 31 Dec 2027 17:00:00 GMT"
    since = int(headers["Deprecation"].removeprefix("@"))
    assert since <= datetime.now(UTC).timestamp()  # no date given: deprecated as of the start


@pytest.mark.parametrize("path", ["/v1/ready", "/v1/sync", "/v1/healthcheck"])
async def test_other_paths_carry_neither(sunsetting: Server, path: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(sunsetting.url + path) as r:
        assert "Deprecation" not in r.headers
        assert "Sunset" not in r.headers


def test_deprecations_are_read_as_documented() -> None:
    deprecations = parsed("deprecations", "/v1=2030-01-01,/v1/old/=2020-01-01/2027-06-30")
    assert set(deprecations) == {"/v1", "/v1/old"}
    assert deprecations["/v1/old"].since == datetime(2020, 1, 1, tzinfo=UTC)
    for bad, error in (
        ("v1=2027-01-01", "expected /path=sunset"),
        ("/v1=someday", "Invalid isoformat string"),
        ("/v1=2028-01-01/2027-01-01", "the sunset comes before the deprecation"),
        ("/v1", "expected /path=sunset"),
    ):
        with pytest.raises(ValueError, match=error):
            parsed("deprecations", bad)


# --- every route declares its permission ------------------------------------------------------


def test_every_route_the_server_registers_declares_a_permission(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, data_dir=str(tmp_path), oidc_issuer="http://127.0.0.1:1")
    app = create_app(settings)
    assert undeclared(app.router.routes()) == []
    # Nor does the table hold entries for routes that no longer exist.
    registered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    assert set(ROUTE_PERMISSIONS) - registered == set()


@asynccontextmanager
async def server_with_an_extra_route(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[str]:
    settings = Settings.load(environ={}, data_dir=str(tmp_path), oidc_issuer=issuer.issuer, port=0)
    app = create_app(settings)

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"secret": "anyone could read this"})

    app.router.add_get("/v1/forgotten", handler)
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_route_without_a_declared_permission_is_refused(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    async with server_with_an_extra_route(tmp_path, issuer) as url:
        status, _, body = await get(url + "/v1/forgotten")
        assert (status, body["code"]) == (403, "forbidden")
        # …and unknown paths still get aiohttp's own 404.
        async with aiohttp.ClientSession() as http, http.get(url + "/v1/nowhere") as r:
            assert r.status == 404


async def test_what_each_route_declares_is_what_it_enforces(server: Server) -> None:
    """Every registered route, driven without a token and, when it is for some roles only,
    with the token of every test user; WebSocket routes are told apart by accepting the
    upgrade."""
    checked = set()
    # Outbox entry 1, for the admin routes that act on one entry.
    server.app[BACKEND].outbox.route({"wo": ["perm"]})
    await server.app[STORE].append(
        Write("wo:perm0", work_order("wo:perm0").get_update(), Origin(OriginKind.REST), "sam")
    )
    for route in server.app.router.routes():
        permission = permission_of(route)
        assert permission is not None
        assert route.resource is not None
        if route.method == "HEAD":
            continue  # what GET needs (RFC 9110 §9.3.2)
        path = route.resource.canonical.replace("{doc_id}", "wo:perm1")
        path = path.replace("{dataset}", "perm1")
        path = path.replace("{upload_id}", "perm1").replace("{sha256}", "perm1")
        path = path.replace("{entry_id}", "1").replace("{team}", "perm1")
        checked.add(permission)
        if route.method == "GET":
            anonymous = await _anonymous(server, path)
        else:
            async with (
                aiohttp.ClientSession() as http,
                http.request(route.method, server.url + path) as response,
            ):
                anonymous = response.status
        if permission is Permission.PUBLIC:
            assert anonymous not in (401, 403, CloseCode.UNAUTHORIZED), (route, anonymous)
            continue
        assert anonymous in (401, CloseCode.UNAUTHORIZED), (route, anonymous)
        if permission.roles is None:
            continue
        for user in USERS.values():
            allowed = bool(permission.roles & {Role(r) for r in user.roles})
            headers = {"Authorization": f"Bearer {server.token(user.subject)}"}
            if route.method == "GET":
                status = (await get(server.url + path, headers))[0]
            else:
                # The role-restricted routes that take a body (reference imports) read JSON
                # lines, and take an empty one.
                headers["Content-Type"] = "application/x-ndjson"
                async with (
                    aiohttp.ClientSession() as http,
                    http.request(route.method, server.url + path, headers=headers) as response,
                ):
                    status = response.status
            assert status == (200 if allowed else 403), (route, user.subject, status)
    assert checked == set(ROUTE_PERMISSIONS.values())


async def _anonymous(server: Server, path: str) -> int:
    """The HTTP status, or the WebSocket close code, that a caller with no token gets."""
    ws_url = server.url.replace("http", "ws", 1) + path
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(ws_url)
        except aiohttp.WSServerHandshakeError as not_a_websocket:
            return not_a_websocket.status
        wire = Wire(ws)
        try:
            hello = {"type": "hello", "client": {"platform": "test", "version": "1"}, "caps": []}
            with contextlib.suppress(ConnectionError):  # y-websocket may have closed already
                await wire.send(Control(hello))
            code, _ = await wire.closed_with()
            return code or 0
        finally:
            await wire.close()
