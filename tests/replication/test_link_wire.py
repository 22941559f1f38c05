"""A node link's outgoing side when the other node stops reading: bounded, then dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fieldsync.replication import _link
from tests.harness import eventually


@pytest.fixture
async def stalled_node() -> AsyncIterator[str]:
    """A WebSocket endpoint that accepts, then never reads (aiohttp stops taking bytes from
    the socket once its own queue is full, so the sender's buffers fill up)."""
    stop = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await stop.wait()
        return ws

    app = web.Application()
    app.router.add_get("/link", handler)
    async with TestServer(app) as server:
        yield str(server.make_url("/link"))
        stop.set()


async def test_a_link_to_a_node_that_stops_reading_is_dropped_past_its_bound(
    stalled_node: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_link, "_MAX_QUEUED", 1 << 20)
    async with aiohttp.ClientSession() as http, http.ws_connect(stalled_node) as ws:
        wire = _link._Wire(ws)
        part = b"u" * 32_000
        sent = 0
        while not ws.closed:
            assert sent < 2_000, "the link was never dropped"  # 64 MB: unbounded
            wire.send({"op": "update", "doc": "wo:1"}, part)
            sent += 1
            await asyncio.sleep(0)  # the sender takes what the socket still accepts
            if wire._dropping is not None:
                await eventually(lambda: ws.closed, timeout=10)
        dropped = [r for r in caplog.records if "the link is dropped" in r.getMessage()]
        assert len(dropped) == 1
        # Nothing more is queued for a dropped link.
        wire.send({"op": "update", "doc": "wo:1"}, part)
        assert wire._queued == 0
        await wire.close()
