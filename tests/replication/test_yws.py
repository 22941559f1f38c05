"""Plain y-websocket (`/v1/yws/{doc_id}`) as a stock Yjs provider speaks it, message by message:
the close codes the README gives, and a document created from a socket that announced its
presence before the document existed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from pycrdt import Doc, Map

from fieldsync.errors import CloseCode
from fieldsync.replication import SyncStep, YAwareness, YSync, decode_y, encode_sync
from fieldsync.replication._awareness import decode_update, encode_update
from tests.harness import Server, stored_doc, work_order
from tests.wire import connect


class Yws:
    """One y-websocket connection: every message received, decoded, and the close."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.received: list[YSync | YAwareness] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                y = decode_y(message.data)
                if isinstance(y, YSync | YAwareness):
                    self.received.append(y)
            elif message.type is aiohttp.WSMsgType.CLOSE:
                self.close_code, self.close_reason = message.data, str(message.extra or "")
            closing = message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            )
            if closing and self.close_code is None:
                self.close_code = self.ws.close_code or 1006
            async with self._arrived:
                self._arrived.notify_all()
            if closing:
                return

    async def wait(self, what: str, predicate: Callable[[], object]) -> None:
        async with asyncio.timeout(10), self._arrived:
            await self._arrived.wait_for(lambda: predicate() or self.close_code is not None)
        if not predicate():
            raise AssertionError(f"closed ({self.close_code} {self.close_reason}) before {what}")

    async def step1(self) -> bytes:
        """The server's greeting: its state vector (SyncStep1)."""
        await self.wait("SyncStep1", lambda: self.synced(SyncStep.STEP1))
        return self.synced(SyncStep.STEP1)[0]

    async def replica(self) -> Doc[Any]:
        """The document as the server gives it to a replica that has nothing (its SyncStep2)."""
        await self.ws.send_bytes(encode_sync(SyncStep.STEP1, b"\x00"))
        await self.wait("SyncStep2", lambda: self.synced(SyncStep.STEP2))
        doc: Doc[Any] = Doc()
        doc.apply_update(self.synced(SyncStep.STEP2)[0])
        return doc

    def synced(self, step: SyncStep) -> list[bytes]:
        """The payloads of the sync messages of `step` received so far."""
        return [y.payload for y in self.received if isinstance(y, YSync) and y.step is step]

    def presence(self) -> dict[int, str]:
        """The awareness states received, latest per client id."""
        states: dict[int, str] = {}
        for y in self.received:
            if isinstance(y, YAwareness):
                for client, _, state in decode_update(y.payload):
                    states[client] = state
        return states

    async def send_update(self, update: bytes) -> None:
        await self.ws.send_bytes(encode_sync(SyncStep.UPDATE, update))

    async def answer_step1(self) -> None:
        """What a stock provider answers the server's SyncStep1 with while it holds nothing."""
        await self.ws.send_bytes(encode_sync(SyncStep.STEP2, b"\x00\x00"))

    async def announce(self, client: int, clock: int, state: str) -> None:
        await self.ws.send_bytes(encode_update([(client, clock, state)]))

    async def closed(self) -> tuple[int | None, str]:
        async with asyncio.timeout(10), self._arrived:
            await self._arrived.wait_for(lambda: self.close_code is not None)
        return self.close_code, self.close_reason


@asynccontextmanager
async def yws(server: Server, doc_id: str, subject: str) -> AsyncIterator[Yws]:
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.yws_url(doc_id), headers=headers) as ws,
    ):
        peer = Yws(ws)
        try:
            yield peer
        finally:
            await ws.close()
            await asyncio.gather(peer._reader, return_exceptions=True)


# --- close codes -------------------------------------------------------------------------


async def test_a_path_the_role_may_not_write_closes_4403_forbidden_field(server: Server) -> None:
    """README: what y-websocket cannot express becomes a close code, 4403 for what the
    principal may not do, a path of the document included."""
    doc_id = "wo:yws-field"
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await sam.update(doc_id, work_order(doc_id, assignee="tina").get_update())
        await sam.control("ack", doc=doc_id)
    async with yws(server, doc_id, "tina") as tina:
        await tina.step1()
        replica = await tina.replica()
        before = replica.get_state()
        replica.get("fields", type=Map)["title"] = "renamed by a technician"
        await tina.send_update(replica.get_update(before))
        assert await tina.closed() == (CloseCode.FORBIDDEN, "forbidden_field")
    stored = await stored_doc(server, doc_id)
    assert stored.get("fields", type=Map)["title"] != "renamed by a technician"


# --- a document created over y-websocket ---------------------------------------------------


async def test_presence_before_the_document_exists_is_held_not_fatal(server: Server) -> None:
    """Every Yjs provider answers the server's SyncStep1 with its (empty) state and announces
    its presence on connecting. To a role that may create, a new document is an open, empty
    y-websocket: neither is refused, its presence waits for the document, the socket stays
    open, and the document can be created from it (here by ada, for sam's team)."""
    doc_id = "wo:new-1"
    async with yws(server, doc_id, "ada") as ada, yws(server, doc_id, "sam") as sam:
        for peer, client in ((ada, 7), (sam, 8)):
            assert await peer.step1() == b"\x00"  # an empty document
            await peer.answer_step1()
            await peer.announce(client, 1, f'{{"user":"{client}"}}')
        created = work_order(doc_id, assignee="tina", team="north")
        await ada.send_update(created.get_update())
        # Both are admitted once it exists in their scope: each gets the document and hears
        # the other's presence, announced while they waited.
        for peer, other in ((ada, 8), (sam, 7)):

            def heard(p: Yws = peer, o: int = other) -> bool:
                return o in p.presence()

            await peer.wait("the other's presence", heard)
            assert peer.presence()[other] == f'{{"user":"{other}"}}'
        await sam.wait("the document", lambda: sam.synced(SyncStep.UPDATE))
        assert ada.close_code is None
        assert sam.close_code is None
    stored = await stored_doc(server, doc_id)
    assert stored.get("fields", type=Map)["assignee"] == "tina"


async def test_presence_of_a_peer_that_may_not_see_the_document_never_reaches_it(
    server: Server,
) -> None:
    """sue (another team's supervisor) waits on an id that sam then creates for his team: she
    is not admitted, nobody hears her presence, and she hears nobody's."""
    doc_id = "wo:new-2"
    async with yws(server, doc_id, "sue") as sue, yws(server, doc_id, "sam") as sam:
        await sue.step1()
        await sue.answer_step1()
        await sue.announce(9, 1, '{"user":"sue"}')
        await sam.step1()
        await sam.announce(8, 1, '{"user":"sam"}')
        await sam.send_update(work_order(doc_id, team="north").get_update())
        await sam.wait("the document", lambda: sam.synced(SyncStep.UPDATE))  # sam is admitted
        async with connect(server.sync_url, server.token("ada")) as ada:
            await ada.hello()
            await ada.step1(doc_id)
            await ada.doc_message(doc_id, SyncStep.STEP2)
            presence = [
                entry
                for doc, y in ada.docs
                if doc == doc_id and isinstance(y, YAwareness)
                for entry in decode_update(y.payload)
            ]
        assert [client for client, _, _ in presence] == [8]
        assert sue.presence() == {}
        assert sue.close_code is None
