"""A bare `fieldsync.v1` connection for tests that speak the protocol message by message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import zstandard
from pycrdt import Doc, Map

from fieldsync import documents
from fieldsync.replication import (
    Control,
    DocMessage,
    SyncStep,
    YSync,
    decode_frame,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
)
from tests.harness import Server, work_order


class Wire:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.controls: list[dict[str, Any]] = []
        # Every control message, in arrival order, kept when `control()` takes it.
        self.received: list[dict[str, Any]] = []
        self.docs: list[tuple[str, Any]] = []
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())
        self.close_code: int | None = None
        self.close_reason = ""

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                for item in decode_frame(message.data, max_frame=1 << 30, max_body=1 << 30):
                    if isinstance(item, Control):
                        self.controls.append(item.body)
                        self.received.append(item.body)
                    else:
                        self.docs.append((item.doc, decode_y(item.message)))
            elif message.type is aiohttp.WSMsgType.CLOSE:
                self.close_code = message.data
                self.close_reason = str(message.extra or "")
            if message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                if self.close_code is None:
                    self.close_code = self.ws.close_code
                async with self._arrived:
                    self._arrived.notify_all()
                return
            async with self._arrived:
                self._arrived.notify_all()

    async def send(self, *messages: Control | DocMessage, compress: bool = False) -> None:
        bodies = [encode_body(m) for m in messages]
        compressor = zstandard.ZstdCompressor() if compress else None
        await self.ws.send_bytes(encode_frame(bodies, compressor=compressor, compress_above=0))

    async def send_raw(self, frame: bytes) -> None:
        await self.ws.send_bytes(frame)

    async def hello(self, since: int = 0, **client: Any) -> dict[str, Any]:
        info = {"platform": "test", "version": "1.0.0", "device_id": "wire", **client}
        await self.send(Control({"type": "hello", "client": info, "since": since, "caps": []}))
        return await self.control("welcome")

    async def step1(self, doc_id: str, state_vector: bytes = b"\x00") -> None:
        await self.send(DocMessage(doc_id, encode_sync(SyncStep.STEP1, state_vector)))

    async def update(self, doc_id: str, update: bytes) -> None:
        await self.send(DocMessage(doc_id, encode_sync(SyncStep.UPDATE, update)))

    async def _take(self, pool: list[Any], matches: Any, what: str, timeout: float) -> Any:
        """Remove and return the first item of `pool` that `matches`, waiting for it."""
        taken: list[Any] = []

        def ready() -> bool:
            for i, item in enumerate(pool):
                if matches(item):
                    taken.append(pool.pop(i))
                    return True
            return self.closed

        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(ready)
        if not taken:
            raise AssertionError(f"closed ({self.close_code} {self.close_reason}) before {what}")
        return taken[0]

    async def control(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first control message of `kind` (with fields equal to `match`) not yet taken."""
        control: dict[str, Any] = await self._take(
            self.controls,
            lambda body: (
                body.get("type") == kind and all(body.get(k) == v for k, v in match.items())
            ),
            kind,
            timeout,
        )
        return control

    async def doc_message(self, doc_id: str, step: SyncStep, timeout: float = 10.0) -> bytes:
        """The payload of the first y-protocols sync message of `step` about `doc_id`."""
        item = await self._take(
            self.docs,
            lambda item: item[0] == doc_id and isinstance(item[1], YSync) and item[1].step is step,
            f"{step.name} of {doc_id}",
            timeout,
        )
        payload: bytes = item[1].payload
        return payload

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    async def closed_with(self, timeout: float = 10.0) -> tuple[int | None, str]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.closed)
        return self.close_code, self.close_reason

    async def replica(self, doc_id: str) -> Doc[Any]:
        """A fresh replica of `doc_id`, synced from the server (SyncStep1 with an empty state)."""
        await self.step1(doc_id)
        doc: Doc[Any] = Doc()
        doc.apply_update(await self.doc_message(doc_id, SyncStep.STEP2))
        return doc

    async def edit(self, doc_id: str, doc: Doc[Any], **fields: object) -> None:
        """Set `fields` on the replica `doc` and send what changed."""
        before = doc.get_state()
        doc.get("fields", type=Map).update(fields)
        await self.update(doc_id, doc.get_update(before))

    async def move(self, doc_id: str, doc: Doc[Any], status: str, by: str, role: str) -> None:
        """Move the replica `doc` to `status` the way an app does, and send what changed."""
        before = doc.get_state()
        documents.work_order.set_status(doc, status, by=by, role=role)
        await self.update(doc_id, doc.get_update(before))

    async def follow(self, doc_id: str, doc: Doc[Any], until: Callable[[Doc[Any]], bool]) -> None:
        """Apply the updates received for `doc_id` to `doc` until `until(doc)` holds."""
        while not until(doc):
            doc.apply_update(await self.doc_message(doc_id, SyncStep.UPDATE))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


@asynccontextmanager
async def connect(url: str, token: str | None) -> AsyncIterator[Wire]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        wire = Wire(ws)
        try:
            yield wire
        finally:
            await wire.close()


@asynccontextmanager
async def sam_and_tina(
    server: Server, doc_id: str | None = None, **fields: Any
) -> AsyncIterator[tuple[Wire, Wire]]:
    """sam (a supervisor) and tina (a technician of his team), connected and greeted; with
    `doc_id`, the work order sam created there first, durably (`work_order(doc_id, **fields)`)."""
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
    ):
        await sam.hello()
        await tina.hello()
        if doc_id is not None:
            await sam.update(doc_id, work_order(doc_id, **fields).get_update())
            await sam.control("ack", doc=doc_id)
        yield sam, tina
