"""A stock Yjs client in Node (`yjs_peer.mjs`), driven over stdin/stdout JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Server, unavailable

HERE = Path(__file__).parent
PEER = HERE / "yjs_peer.mjs"
PACKAGES = ("yjs", "y-websocket", "ws")


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    absent = [p for p in PACKAGES if not (HERE / "node_modules" / p / "package.json").exists()]
    if absent:
        return f"{', '.join(absent)} not installed: run `cd tests/interop && npm ci`"
    return None


@pytest.fixture
def node() -> None:
    """Skip without Node and the interop packages, or fail when CI says they must be there."""
    missing = _missing()
    if missing is None:
        return
    unavailable(f"Yjs interop needs Node: {missing}")


class YjsPeer:
    """One Node process holding one Y.Doc and a y-websocket `WebsocketProvider` for it."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.stderr = bytearray()
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())
        self._errors = asyncio.create_task(self._read_stderr())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            message = json.loads(line)
            if "id" in message:
                reply = self._replies.pop(message["id"])
                if not reply.done():  # not given up on by a timed-out request
                    reply.set_result(message)
            else:
                async with self._event:
                    self.events.append(message)
                    self._event.notify_all()
        # The process ended: nothing pending will ever be answered.
        await self._errors
        for future in self._replies.values():
            if not future.done():
                future.set_exception(RuntimeError(f"{self.name} exited:\n{self.stderr.decode()}"))
        self._replies.clear()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr += line

    async def request(self, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        if self._reader.done():
            raise RuntimeError(f"{self.name} has exited:\n{self.stderr.decode()}")
        ident = next(self._ids)
        reply = self._replies[ident] = asyncio.get_running_loop().create_future()
        self.process.stdin.write(json.dumps({"id": ident, "cmd": cmd, **args}).encode() + b"\n")
        await self.process.stdin.drain()
        async with asyncio.timeout(timeout):
            message: dict[str, Any] = await reply
        if "error" in message:
            raise AssertionError(f"{self.name}: {cmd} failed: {message['error']}")
        return message

    async def connect(self, token: str) -> dict[str, Any]:
        """Connect (or reconnect) with `token`: `{ok: True}` once synced, else the close code."""
        return await self.request("connect", token=token)

    async def disconnect(self) -> None:
        await self.request("disconnect")

    async def edit(self, ops: list[dict[str, Any]]) -> None:
        await self.request("edit", ops=ops)

    async def dump(self) -> dict[str, Any]:
        return await self.request("dump")

    async def set_awareness(self, state: dict[str, Any] | None) -> None:
        await self.request("awareness", state=state)

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], after: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first event from `events[after]` on, already seen or still to come, that
        satisfies `predicate`."""
        async with asyncio.timeout(timeout), self._event:
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                await self._event.wait()

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.request("exit", timeout=2)
            try:
                async with asyncio.timeout(5):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await asyncio.gather(self._reader, self._errors, return_exceptions=True)


YjsPeerFactory = Callable[[str], Awaitable[YjsPeer]]


@pytest.fixture
async def yjs_peer(node: None, server: Server) -> AsyncIterator[YjsPeerFactory]:
    """`await yjs_peer(doc_id)` starts a Node Yjs peer for `doc_id` on this test's server."""
    peers: list[YjsPeer] = []

    async def start(doc_id: str) -> YjsPeer:
        process = await asyncio.create_subprocess_exec(
            "node",
            str(PEER),
            server.yws_url(""),  # the provider appends "/<doc id>" itself
            doc_id,
            cwd=HERE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        peer = YjsPeer(process, f"yjs-peer-{len(peers) + 1}")
        peers.append(peer)
        return peer

    yield start
    await asyncio.gather(*(peer.close() for peer in peers))
