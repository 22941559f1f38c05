"""What one client can hold of the server: WebSockets per token subject, and the time a
connection may take to send a complete request head."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map, Text

from fieldsync.app import ENDPOINTS
from fieldsync.auth import DevIssuer
from fieldsync.errors import CloseCode
from fieldsync.replication import Control
from tests.harness import Server, eventually, running_server, stored_doc, work_order
from tests.wire import Wire, connect, sam_and_tina

LIMIT = 3


@pytest.fixture
async def capped(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    async with running_server(tmp_path, issuer, max_sockets_per_subject=LIMIT) as server:
        yield server


async def hello_in_band(wire: Wire, token: str) -> None:
    """What a browser does: no header, the token in `hello`."""
    info = {"platform": "web", "version": "1.0.0", "device_id": "tab"}
    await wire.send(Control({"type": "hello", "client": info, "token": token, "caps": []}))


async def test_one_subject_holds_at_most_the_limit_of_sockets(capped: Server) -> None:
    endpoints = capped.app[ENDPOINTS]
    async with AsyncExitStack() as stack:
        held = []
        for _ in range(LIMIT - 1):
            wire = await stack.enter_async_context(connect(capped.sync_url, capped.token("sam")))
            await wire.hello()
            held.append(wire)
        yws = await stack.enter_async_context(aiohttp.ClientSession())
        # An open, empty y-websocket: sam may create work orders.
        first_yws = await yws.ws_connect(
            capped.yws_url("wo:cap-1"), headers={"Authorization": f"Bearer {capped.token('sam')}"}
        )
        # sam holds LIMIT sockets (v1 and y-websocket alike): the next is closed at once,
        # whichever way it authenticates.
        over = await stack.enter_async_context(connect(capped.sync_url, capped.token("sam")))
        assert await over.closed_with() == (CloseCode.RATE_LIMITED, "too_many_connections")
        browser = await stack.enter_async_context(connect(capped.sync_url, None))
        await hello_in_band(browser, capped.token("sam"))
        assert await browser.closed_with() == (CloseCode.RATE_LIMITED, "too_many_connections")
        refused_yws = await yws.ws_connect(
            capped.yws_url("wo:cap-2"), headers={"Authorization": f"Bearer {capped.token('sam')}"}
        )
        message = await refused_yws.receive()
        assert (message.data, message.extra) == (CloseCode.RATE_LIMITED, "too_many_connections")
        # Others are not concerned, and the held sockets keep working.
        async with connect(capped.sync_url, capped.token("tina")) as tina:
            await tina.hello()
        await held[0].step1("wo:cap-3")
        assert not held[0].closed
        # A socket closed gives its place back.
        await first_yws.close()
        await eventually(lambda: len(endpoints.connections) == LIMIT - 1)
        again = await stack.enter_async_context(connect(capped.sync_url, capped.token("sam")))
        assert (await again.hello())["type"] == "welcome"


async def test_a_client_trickling_its_request_head_is_closed_in_time(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """Slowloris: a byte every 50 ms never completes a request head; the server closes the
    connection once `header_timeout` has passed instead of holding it for minutes."""
    async with running_server(tmp_path, issuer, header_timeout=0.5) as server:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()

        async def trickle() -> None:
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while True:
                await asyncio.sleep(0.05)
                writer.write(b"a")
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            # Closed, nothing answered, well before the minutes a trickler was held before (the
            # bound is loose: a loaded machine is slow, not wrong). A reset is a close too.
            async with asyncio.timeout(10):
                with suppress(ConnectionResetError):
                    assert await reader.read() == b""
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
            writer.close()
        assert time.monotonic() - started > 0.4, "closed before header_timeout"
        # A client that sends its request in time is answered.
        async with aiohttp.ClientSession() as http, http.get(server.url + "/v1/health") as r:
            assert r.status == 200


def largest_send_buffer() -> int:
    """The most a TCP socket's send buffer grows to here (tcp_wmem's maximum), in bytes."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def test_a_socket_that_stops_reading_is_dropped_and_holds_no_more_than_the_limit(
    tmp_path: Path, issuer: DevIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """A device whose socket stops taking what it is sent (a zero receive window) is not
    buffered for without end: past `max_queued` bytes of updates it is dropped, once, and the
    other devices' writes go on, every one stored."""
    limit = 256 << 10
    async with (
        running_server(tmp_path, issuer, max_queued=limit) as server,
        connect(server.sync_url, server.token("sam")) as sam,
    ):
        endpoints = server.app[ENDPOINTS]
        await sam.hello()
        doc = work_order("wo:1", assignee="tina")
        await sam.update("wo:1", doc.get_update())
        await sam.control("ack")
        # tina's y-websocket, opened by hand with a tiny receive buffer, then never read.
        host, port = server.url.removeprefix("http://").split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        await asyncio.get_running_loop().sock_connect(stalled, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=stalled)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/yws/wo:1 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {server.token('tina')}\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await eventually(lambda: len(endpoints.connections) == 2)
        text = doc.get("notes", type=Text)
        chunk, sent = 16_000, 0
        # The kernel's send buffer for the socket fills first (up to tcp_wmem's maximum).
        kernel = largest_send_buffer()
        while len(endpoints.connections) == 2:
            assert sent * chunk < 2 * kernel + (8 << 20), "the stalled socket was never dropped"
            for _ in range(10):
                before = doc.get_state()
                text.insert(len(text), f"{sent:05d}".ljust(chunk, "x"))
                await sam.update("wo:1", doc.get_update(before))
                sent += 1
            for _ in range(10):
                await sam.control("ack")
        assert sent * chunk < kernel + 8 * limit
        dropped = [r for r in caplog.records if "does not read them; dropped" in r.getMessage()]
        assert len(dropped) == 1
        # sam goes on; everything sam sent is stored.
        before = doc.get_state()
        text.insert(len(text), "after")
        await sam.update("wo:1", doc.get_update(before))
        await sam.control("ack")
        assert str((await stored_doc(server, "wo:1")).get("notes", type=Text)) == str(text)
        # What tina's socket gets is what it had buffered, then the end.
        with suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while await reader.read(1 << 16):
                    pass
        writer.close()


async def test_refused_writes_past_the_refusal_rate_slow_the_connection_down(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """A refused write is paid for (the document is rebuilt as it was before it): past
    `refusal_rate` a second, after five seconds' worth, a connection's next message waits, so a
    device that sends refused writes in a loop costs the server a bounded share. It is slowed,
    not dropped: every refusal is reported, and its next allowed edit is stored."""
    rate = 10.0
    async with (
        running_server(tmp_path, issuer, refusal_rate=rate) as server,
        sam_and_tina(server, "wo:r", assignee="tina") as (_, tina),
    ):
        base = (await tina.replica("wo:r")).get_update()
        refused = int(rate * 5) + 10  # the burst, then ten that wait 1 / rate each
        started = time.monotonic()
        for n in range(refused):
            theirs: Doc[Any] = Doc()
            theirs.apply_update(base)
            before = theirs.get_state()
            theirs.get("fields", type=Map)["assignee"] = f"tom{n}"
            await tina.update("wo:r", theirs.get_update(before))
        for _ in range(refused):
            assert (await tina.control("error", doc="wo:r"))["code"] == "forbidden_field"
        fresh = await tina.replica("wo:r")
        before = fresh.get_state()
        fresh.get("notes", type=Text).insert(0, "on site")
        await tina.update("wo:r", fresh.get_update(before))
        await tina.control("ack", doc="wo:r")
        assert time.monotonic() - started >= 10 / rate * 0.9  # a lower bound: never flaky
        stored = await stored_doc(server, "wo:r")
        assert str(stored.get("notes", type=Text)) == "on site"
        assert stored.get("fields", type=Map)["assignee"] == "tina"
