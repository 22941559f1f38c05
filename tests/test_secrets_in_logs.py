"""No token or secret ever reaches a log line (issue 3).

Real traffic carries tokens every way the server accepts them, and the ways it refuses them,
while every record of every logger is captured at DEBUG, the access log included; then the
captured lines are searched for each token (whole, and its last 20 characters: a signature
fragment is enough to matter) and each password.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fieldsync.api._redaction import redact
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.client import Client
from fieldsync.replication import Control
from tests.harness import USERS, Server, eventually, running_server, work_order
from tests.wire import Wire, connect

PASSWORD = "pw-" + secrets.token_urlsafe(24)
WRONG_PASSWORD = "typo-" + secrets.token_urlsafe(24)
# Any JWS compact serialisation (RFC 7515 §7.1): header and payload are base64url JSON objects.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.?")

# What every record has (and what formatting adds); anything else came in through `extra`.
_RECORD_FIELDS = {*vars(logging.makeLogRecord({})), "message", "asctime"}


class Everything(logging.Handler):
    """Keeps every record as the line a handler would write, traceback, stack and any `extra`
    fields included."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        self.lines.append(self.format(record) + (f" {extra!r}" if extra else ""))

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def capture_every_logger() -> Iterator[Everything]:
    """Root and every existing logger at DEBUG; loggers that do not propagate get the handler
    directly. Everything is put back afterwards."""
    handler = Everything()
    root = logging.getLogger()
    loggers = [root] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    logging.disable(logging.NOTSET)
    root.addHandler(handler)
    isolated = [logger for logger in loggers[1:] if not logger.propagate]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
    for logger in isolated:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in isolated:
            logger.removeHandler(handler)
        root.removeHandler(handler)
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled


@pytest.fixture
def users() -> Mapping[str, DevUser]:
    """The test issuer's users, and one whose password is a secret worth finding."""
    return {**USERS, "pat": DevUser("pat", ("technician",), "north", "east", "Pat", PASSWORD)}


def tampered(token: str) -> str:
    """The same token with its signature's bytes changed: well-formed, and invalid."""
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0xFF
    return f"{header}.{payload}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


class Traffic:
    """Drives the server and remembers every secret it sent."""

    def __init__(self, server: Server, http: aiohttp.ClientSession, logs: Everything) -> None:
        self.server = server
        self.http = http
        self.logs = logs
        self.secrets: list[str] = []

    def token(self, subject: str, **kwargs: Any) -> str:
        return self.keep(self.server.token(subject, **kwargs))

    def keep(self, secret: str) -> str:
        self.secrets.append(secret)
        return secret

    async def get(self, path: str, token: str | None = None, query: bool = False) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token and not query else {}
        url = self.server.url + path + (f"?token={token}" if query else "")
        async with self.http.get(url, headers=headers) as response:
            await response.read()
            return response.status

    async def raw(self, target: bytes, header: bytes) -> bytes:
        """One HTTP/1.1 request written by hand (a malformed one, which no client library
        sends), and the status line of the answer."""
        url = self.server.url.removeprefix("http://")
        host, port = url.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def yws(self, doc_id: str, token: str) -> int | None:
        """Open a y-websocket the browser way (`?token=`) and return how it ended."""
        url = self.server.yws_url(doc_id) + f"?token={token}"
        async with self.http.ws_connect(url) as ws:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                await ws.close()  # the server's sync step 1: the token was accepted
            return ws.close_code

    async def v1_in_band(self, *messages: dict[str, Any]) -> tuple[int | None, str]:
        """A browser's v1 session: no header, the token in `hello` (and `auth`) messages; the
        last message must make the server close the socket."""
        async with self.http.ws_connect(self.server.sync_url) as ws:
            wire = Wire(ws)
            try:
                for message in messages:
                    await wire.send(Control(message))
                    if message["type"] == "hello":
                        with contextlib.suppress(AssertionError):  # refused: closes instead
                            await wire.control("welcome")
                return await wire.closed_with()
            finally:
                await wire.close()


def hello(token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "hello",
        "client": {"platform": "web", "version": "1.0.0", "device_id": "browser-1"},
        "caps": [],
    }
    if token is not None:
        body["token"] = token
    return body


async def test_no_token_or_password_reaches_any_log(tmp_path: Path, issuer: DevIssuer) -> None:
    loop = asyncio.get_running_loop()
    # In debug mode (read when the application starts) aiohttp's server logs more.
    loop.set_debug(True)
    try:
        with capture_every_logger() as logs:
            async with (
                running_server(tmp_path, issuer) as server,
                aiohttp.ClientSession() as http,
            ):
                traffic = Traffic(server, http, logs)
                await drive(traffic)
    finally:
        loop.set_debug(False)

    text = logs.text()
    # The capture saw what it must have seen: the access log, and DEBUG records.
    assert "/v1/yws/wo:log1" in text
    assert "/v1/metrics" in text
    assert "ignoring control message" in text
    leaks = [
        (secret[:12] + "…", line)
        for secret in traffic.secrets
        for line in logs.lines
        if secret in line or (len(secret) > 20 and secret[-20:] in line)
    ]
    assert leaks == []
    assert [line for line in logs.lines if JWT.search(line)] == []


async def drive(traffic: Traffic) -> None:
    server, http = traffic.server, traffic.http

    # The dev issuer's password grant: a good password, then a wrong one.
    token_url = server.issuer.issuer + "/token"
    for password in (traffic.keep(PASSWORD), traffic.keep(WRONG_PASSWORD)):
        form = {"grant_type": "password", "username": "pat", "password": password}
        async with http.post(token_url, data=form) as response:
            body = await response.json()
            if response.status == 200:
                traffic.keep(body["access_token"])

    # The server's token relay: a refresh token, and a code with its PKCE verifier.
    for form in (
        {"grant_type": "refresh_token", "refresh_token": traffic.keep(secrets.token_urlsafe(32))},
        {
            "grant_type": "authorization_code",
            "code": traffic.keep(secrets.token_urlsafe(32)),
            "code_verifier": traffic.keep(secrets.token_urlsafe(48)),
            "redirect_uri": "com.example.field:/callback",
            "client_id": "fieldsync-app",
        },
    ):
        async with http.post(server.url + "/v1/auth/token", data=form) as response:
            assert response.status < 500 or response.status == 503

    # A supervisor creates the work order everyone below uses (Authorization header).
    async with connect(server.sync_url, traffic.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:log1", work_order("wo:log1").get_update())
        await wire.control("ack")
        # An unknown control type is logged at DEBUG: proof the capture sees that level.
        await wire.send(Control({"type": "no-such-type"}))
        await wire.step1("wo:log1")
        await wire.control("changes")

    # Authorization headers on HTTP: allowed, refused by role, no token at all.
    assert await traffic.get("/v1/metrics", traffic.token("ada")) == 200
    assert await traffic.get("/v1/metrics", traffic.token("tina")) == 403
    # A token in a query string where none belongs.
    assert await traffic.get("/v1/health", traffic.token("tina"), query=True) == 200

    # y-websocket the browser way: the token in the URL.
    assert await traffic.yws("wo:log1", traffic.token("tina")) in (1000, None)

    # v1 in band: hello with a token, renewal, then a renewal naming someone else.
    code, reason = await traffic.v1_in_band(
        hello(traffic.token("tina")),
        {"type": "auth", "token": traffic.token("tina")},
        {"type": "auth", "token": traffic.token("tom")},
    )
    assert (code, reason) == (4401, "reauthenticate")

    # Tokens that are refused: expired, tampered, an unknown key id (which makes the server
    # refetch the JWKS), and something that is not a JWT at all; each sent every way.
    refused = [
        traffic.token("tina", ttl=-3600),
        traffic.keep(tampered(server.token("tina"))),
        traffic.token("tina", headers={"kid": "kid-" + secrets.token_hex(8)}),
        traffic.keep("opaque-" + secrets.token_urlsafe(32)),
    ]
    for token in refused:
        assert await traffic.get("/v1/metrics", token) == 401
        async with connect(server.sync_url, token) as wire:
            assert (await wire.closed_with())[0] == 4401
        assert await traffic.yws("wo:log1", token) == 4401
        assert (await traffic.v1_in_band(hello(token)))[0] == 4401

    # Requests the server cannot parse, with a token in the URL: aiohttp logs its parse errors,
    # some with the raw request line.
    for garbage in (b"\x01", b" extra", b" HTTP/9.9"):
        target = b"/v1/yws/wo:log1?token=" + traffic.token("tina").encode() + garbage
        assert (await traffic.raw(target, b"X: y")).startswith(b"HTTP/1.0 400")
    for header in (b"Bad\x01Header: x", b"Content-Length: -1", b"X: " + b"y" * 9000):
        target = b"/v1/yws/wo:log1?token=" + traffic.token("tina").encode()
        assert (await traffic.raw(target, header)).startswith(b"HTTP/1.0 400")
    header = b"Authorization: Bearer " + traffic.token("tina").encode() + b"\x01"
    assert (await traffic.raw(b"/v1/metrics", header)).startswith(b"HTTP/1.0 400")

    # The Python client: once against a URL that is not a WebSocket (its reconnect loop logs
    # the failure), once for real.
    lost = Client(server.url.replace("http", "ws", 1) + "/v1/nowhere", traffic.token("tina"))
    await lost.start()
    try:
        await eventually(lambda: any("connection failed" in line for line in traffic.logs.lines))
    finally:
        await lost.close()
    device = Client(server.sync_url, traffic.token("tina"))
    await device.start()
    try:
        await device.wait_synced("wo:log1")
    finally:
        await device.close()


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        (
            "b'GET /v1/yws/wo:1?token=abc.def-ghi HTTP/1.1'",
            "b'GET /v1/yws/wo:1?token=[redacted] HTTP/1.1'",
        ),
        (
            "grant_type=refresh_token&refresh_token=r1&x=1",
            "grant_type=refresh_token&refresh_token=[redacted]&x=1",
        ),
        ("code=c1&code_verifier=v1", "code=[redacted]&code_verifier=[redacted]"),
        ("Authorization: Bearer abc/DEF+ghi==", "Authorization: Bearer [redacted]"),
        ("saw eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0In0.c2ln in a body", "saw [redacted] in a body"),
        ('127.0.0.1 "GET /v1/health" 200 175 0.5ms', '127.0.0.1 "GET /v1/health" 200 175 0.5ms'),
    ],
)
def test_what_aiohttp_logs_is_redacted(line: str, redacted: str) -> None:
    assert redact(line) == redacted
