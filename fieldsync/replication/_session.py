"""One device's `fieldsync.v1` session (DESIGN.md §3): the protocol core, with no transport.

The transport feeds it frames (`receive`) and sends what `outgoing` returns; a `SessionClosed`
raised from `receive` tells it which close code to send.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from enum import Enum
from typing import Any

import zstandard
from pycrdt import get_state

from fieldsync import logs
from fieldsync.auth import Principal, Verify, version_tuple
from fieldsync.documents import MAX_DOC_ID, InvalidDocId, doc_type
from fieldsync.errors import AuthError, CloseCode, ErrorCode, FieldsyncError, ProtocolError
from fieldsync.records import Origin, OriginKind
from fieldsync.replication._codec import (
    EMPTY_UPDATE,
    Control,
    DocMessage,
    SyncStep,
    YAwareness,
    YSync,
    decode_frame,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
    state_entries,
    varuint_value,
)
from fieldsync.replication._connection import (
    DEFAULT_LIMITS,
    Connection,
    Limits,
    SubjectSockets,
)
from fieldsync.replication._replicator import Forbidden, Replicator
from fieldsync.replication._room import Room
from fieldsync.replication._views import Views
from fieldsync.storage import Committed, DeviceSeen

log = logging.getLogger(__name__)

# Errors after which the device's copy may hold what the server refused: it must resync.
_RESET_ON = frozenset(
    {
        ErrorCode.FORBIDDEN,
        ErrorCode.FORBIDDEN_FIELD,
        ErrorCode.INVALID_UPDATE,
        ErrorCode.DOC_TOO_LARGE,
        ErrorCode.RESYNC_REQUIRED,
    }
)


_MAX_SEQ = (1 << 53) - 1
# Step 1s of one BATCH whose rooms are loaded together: one read and one thread hop for them all,
# few enough that the first answers leave before the last rooms are built.
_LOAD_TOGETHER = 200
_STEP1 = bytes((0, 0))  # a y-protocols sync message, step 1


def _text(value: object, limit: int) -> str:
    """A client-info field as text. Only scalars: `str()` of a JSON value nested a thousand
    deep raises RecursionError."""
    if isinstance(value, str):
        return value[:limit]
    return str(value)[:limit] if isinstance(value, int | float) else ""


# zstd levels: 3 for live traffic; 9 for a large frame (a catch-up of many documents), where it
# saves a tenth of the bytes for about 10 µs more per document (S3).
_LEVEL, _LEVEL_LARGE, _LARGE = 3, 9, 64 << 10
_compressors = threading.local()


def _compressor(size: int) -> zstandard.ZstdCompressor:
    """The zstd compressor of this thread for `size` bytes, shared by every session: once used,
    a compressor holds its working memory (tens of KiB), which one per session would hold for
    every idle device (S4). A session compresses between its awaits: sharing is safe."""
    level = _LEVEL_LARGE if size >= _LARGE else _LEVEL
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(
        _compressors, "by_level", None
    )
    if compressors is None:
        compressors = _compressors.by_level = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor


class State(Enum):
    AWAITING_HELLO = "awaiting_hello"
    LIVE = "live"


class V1Session(Connection):
    """A device replicating many documents over one WebSocket."""

    def __init__(
        self,
        replicator: Replicator,
        verify: Verify,
        *,
        principal: Principal | None,
        limits: Limits = DEFAULT_LIMITS,
        min_versions: dict[str, str] | None = None,
        sockets: SubjectSockets | None = None,
        views: Views | None = None,
    ) -> None:
        super().__init__(replicator, principal, limits, sockets)
        self.views = views
        self.verify = verify
        self.min_versions = min_versions or {}
        self.state = State.AWAITING_HELLO
        self.device_id = ""
        self.client = ("", "")  # (platform, version) from `hello`
        self._zstd = False  # the device takes zstd frames
        self._stale = False  # away longer than the offline contract allows
        self._renewed: set[str] = set()  # documents reset for that already
        self._told: dict[str, bool] | None = None  # document -> last told in scope, once moved

    def frames(self, bodies: list[bytes]) -> list[bytes]:
        """`bodies` as BATCH frames of at most half the frame limit, zstd when it pays: a
        device coming back from days offline gets its catch-up in few, small frames."""
        frames = []
        chunk: list[bytes] = []
        size = 0
        for body in bodies:
            if chunk and size + len(body) > self.limits.max_frame // 2:
                frames.append(self._frame(chunk, size))
                chunk, size = [], 0
            chunk.append(body)
            size += len(body)
        frames.append(self._frame(chunk, size))
        return frames

    def _frame(self, bodies: list[bytes], size: int) -> bytes:
        compressor = _compressor(size) if self._zstd else None
        return encode_frame(
            bodies, compressor=compressor, compress_above=self.limits.compress_above
        )

    async def receive(self, frame: bytes) -> None:
        """Handle one WebSocket message. Raises `SessionClosed` when the connection must close."""
        self.admit()
        try:
            messages = decode_frame(
                frame, max_frame=self.limits.max_frame, max_body=self.limits.max_body
            )
        except ProtocolError as exc:
            self.close(exc.close, exc.message)
        if len(messages) > 1:
            self.admit(len(messages) - 1)
            # Answer a BATCH in few frames: the sender waits until it is handled (zstd gains
            # on many documents together, not on one at a time).
            self._corked = True
        try:
            for start in range(0, len(messages), _LOAD_TOGETHER):
                group = messages[start : start + _LOAD_TOGETHER]
                if len(group) > 1 and self.state is State.LIVE:
                    await self._load_rooms(group)
                for message in group:
                    logs.bind(
                        doc=None if isinstance(message, Control) else message.doc[:MAX_DOC_ID]
                    )
                    if isinstance(message, Control):
                        await self._control(message)
                    else:
                        await self._doc(message)
                    if self._closed is not None:
                        raise self._closed
        finally:
            if self._corked:
                self._corked = False
                self._wake()

    async def _load_rooms(self, messages: Sequence[Control | DocMessage]) -> None:
        """Load together the rooms that the step 1s of a BATCH will subscribe to (a device
        offering every document it holds, or none after a reinstall). Only the loading is
        shared: each document is still authorised, and answered, on its own."""
        if self._stale:
            return  # its documents are reset, not answered
        doc_ids = []
        for message in messages:
            if (
                isinstance(message, DocMessage)
                and message.message[:2] == _STEP1
                and message.doc not in self.rooms
            ):
                try:
                    doc_type(message.doc)
                except InvalidDocId:
                    continue  # refused on its own turn
                doc_ids.append(message.doc)
        if len(doc_ids) > 1:
            await self.replicator.load_rooms(doc_ids)

    def shutdown(self) -> None:
        if self.views is not None:
            self.views.leave(self)
        super().shutdown()

    # --- Peer ---------------------------------------------------------------------------

    def send_doc(self, doc_id: str, message: bytes) -> None:
        self._queue(encode_body(DocMessage(doc_id, message)))

    def send_control(self, body: dict[str, Any]) -> None:
        self._queue(encode_body(Control(body)))

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        if update is not None:
            self.send_doc(doc_id, encode_sync(SyncStep.UPDATE, update))

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        if added := self._news(doc_ids, True):
            self.send_control({"type": "scope", "added": added, "removed": []})

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        for doc_id in doc_ids:
            self.rooms.pop(doc_id, None)
        if removed := self._news(doc_ids, False):
            self.send_control({"type": "scope", "added": [], "removed": removed})

    def _news(self, doc_ids: Sequence[str], in_scope: bool) -> list[str]:
        """The documents whose move this device has not been told yet. In a cluster a move
        reaches a session served through the owner twice: over the node-to-node link and
        through this node's change feed follower."""
        if self._told is None:
            self._told = {}  # created lazily: most sessions never see a move
        told = self._told
        news = [doc_id for doc_id in doc_ids if told.get(doc_id) is not in_scope]
        told.update((doc_id, in_scope) for doc_id in news)
        return news

    def reset(self, doc_id: str, reason: str) -> None:
        room = self.rooms.pop(doc_id, None)
        if room is not None:
            self.replicator.unsubscribe(self, room)
        self.send_control({"type": "reset", "doc": doc_id[:MAX_DOC_ID], "reason": reason})

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        self._error(ErrorCode.RULE_VIOLATION, detail, doc_id, rule=rule, detail=detail)

    def _expiring(self) -> None:
        self.send_control({"type": "auth_expiring", "at": self.principal.expires_at})

    def _error(
        self, code: ErrorCode, message: str, doc_id: str | None = None, **detail: Any
    ) -> None:
        body: dict[str, Any] = {"type": "error", "code": code.value, "message": message, **detail}
        if doc_id is not None:
            body["doc"] = doc_id[:MAX_DOC_ID]
        self.send_control(body)

    # --- control messages ---------------------------------------------------------------

    async def _control(self, message: Control) -> None:
        match message.type:
            case "hello":
                await self._hello(message.body)
            case "auth":
                await self._auth(message.body)
            case _ if self.state is State.AWAITING_HELLO:
                self.close(CloseCode.PROTOCOL_ERROR, "expected hello")
            case "subscribe" | "unsubscribe" if self.views is not None:
                await self.views.control(self, message.body)
            case other:
                # Unknown types are ignored so that both sides can evolve (DESIGN.md §3).
                log.debug("session %s: ignoring control message %r", self.id, other[:40])

    async def _authenticate(self, token: object) -> Principal:
        if not isinstance(token, str) or not token:
            self.close(CloseCode.UNAUTHORIZED, ErrorCode.REAUTHENTICATE)
        try:
            return await self.verify(str(token))
        except AuthError as exc:
            self.close(CloseCode.UNAUTHORIZED, exc.code)
            raise  # unreachable: close raises

    async def _auth(self, body: dict[str, Any]) -> None:
        principal = await self._authenticate(body.get("token"))
        if self.authenticated:
            # Renewal on a live socket: the same person with the same view of the documents.
            policy = self.replicator.policy
            if principal.subject != self.principal.subject or policy.scope(principal) != self.scope:
                self.close(CloseCode.UNAUTHORIZED, ErrorCode.REAUTHENTICATE)
            self.principal = principal
            if self.state is State.LIVE:
                self._schedule_expiry()
            return
        self.principal = principal
        self.scope = self.replicator.policy.scope(principal)
        self.authenticated = True
        self._count_socket()
        if self._closed is not None:
            raise self._closed

    async def _hello(self, body: dict[str, Any]) -> None:
        if self.state is not State.AWAITING_HELLO:
            self.close(CloseCode.PROTOCOL_ERROR, "hello sent twice")
        if not self.authenticated:
            await self._auth(body)
        client = body.get("client")
        client = client if isinstance(client, dict) else {}
        platform = _text(client.get("platform"), 32)
        version = _text(client.get("version"), 32)
        self.device_id = _text(client.get("device_id"), 128) or self.id
        self.client = (platform, version)  # for the metrics: sessions by platform and version
        logs.bind(subject=self.principal.subject, device=self.device_id)
        self.origin = Origin(OriginKind.DEVICE, self.device_id)
        minimum = self.min_versions.get(platform)
        if minimum and version_tuple(version) < version_tuple(minimum):
            self.close(CloseCode.UPGRADE_REQUIRED, ErrorCode.CLIENT_UPGRADE_REQUIRED)
        caps = body.get("caps")
        self._zstd = isinstance(caps, list) and "zstd" in caps
        since = body.get("since")
        # A change seq is a SQLite INTEGER (and a JavaScript safe integer): a larger one would
        # fail the device's row in the writer's batch, and with it the other devices' updates.
        # JSON `true` is no seq, though Python's bool is an int: it would come back in `changes`.
        if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= _MAX_SEQ:
            since = 0
        store = self.replicator.store
        head = await store.head()
        if since > head:
            # The server holds less than the device has seen: restored from a backup. The feed
            # starts over, and the device's offer of its documents (step 1) gets the server's
            # state vector back, so it sends every edit the server lost, acknowledged or not.
            log.info("device %s is ahead of the server (%d > %d)", self.device_id, since, head)
            since = 0
        last_seen = await store.last_seen(self.device_id, self.principal.subject)
        # The offline contract: a device away longer than `max_offline` resyncs every document
        # it offers from scratch (`reset`), and re-applies its unsynced edits on top.
        self._stale = last_seen is not None and time.time() - last_seen > self.limits.max_offline
        self.state = State.LIVE
        self.replicator.peers[self] = None
        limits = self.limits
        self.send_control(
            {
                "type": "welcome",
                "server_seq": head,
                "session": self.id,
                "min_client_version": minimum,
                "limits": {
                    "max_frame": limits.max_frame,
                    "max_body": limits.max_body,
                    "max_doc_bytes": limits.max_doc_bytes,
                    "rate": limits.rate,
                },
                "token_expires_at": self.principal.expires_at,
                # Who the server takes the device's user to be: the name and role an app puts
                # in the log entries it appends (a status change, a meter reading).
                "principal": {
                    "subject": self.principal.subject,
                    "roles": sorted(role.value for role in self.principal.roles),
                },
            }
        )
        self._schedule_expiry()
        principal = self.principal
        seen = DeviceSeen(
            self.device_id,
            principal.subject,
            platform,
            version,
            since,
            principal.team,
            principal.region,
        )
        store.touch_device(seen)
        self.spawn(self._send_changes(seen))

    async def _send_changes(self, seen: DeviceSeen) -> None:
        store = self.replicator.store
        since = seen.last_seq
        while True:
            page = await store.changes(self.scope, since, self.limits.changes_page)
            self.send_control(
                {
                    "type": "changes",
                    "since": page.since,
                    "upto": page.upto,
                    "docs": [{"id": d.id, "type": d.type, "seq": d.seq} for d in page.docs],
                    "removed": page.removed,
                    "more": page.more,
                }
            )
            since = page.upto
            if not page.more:
                break
        store.touch_device(
            DeviceSeen(
                seen.device_id,
                seen.subject,
                seen.platform,
                seen.version,
                since,
                seen.team,
                seen.region,
            )
        )

    # --- document messages --------------------------------------------------------------

    async def _doc(self, message: DocMessage) -> None:
        if self.state is not State.LIVE:
            self.close(CloseCode.PROTOCOL_ERROR, "expected hello")
        doc_id = message.doc
        try:
            doc_type(doc_id)
            y = decode_y(message.message)
            if isinstance(y, YSync) and y.step is SyncStep.STEP1:
                if self._stale and doc_id not in self._renewed:
                    self._renewed.add(doc_id)
                    self.reset(doc_id, "offline_too_long")
                    return
                room = await self._subscribe(doc_id)
                update = await self.replicator.read(self, room, y.payload)
                self.send_doc(doc_id, encode_sync(SyncStep.STEP2, update))
                state_vector = await self.replicator.durable_state_vector(self, room)
                self.send_doc(doc_id, encode_sync(SyncStep.STEP1, state_vector))
            elif isinstance(y, YSync) and y.payload != EMPTY_UPDATE:
                await self._update(doc_id, y.payload)
            elif isinstance(y, YAwareness):
                subscribed = self.rooms.get(doc_id)
                if subscribed is None:
                    raise Forbidden(doc_id)
                self.replicator.relay_awareness(self, subscribed, y.payload)
        except ProtocolError as exc:
            # A malformed y-protocols message concerns one document: the device is told, the
            # connection and its other documents go on.
            self.replicator.observer.refused(ErrorCode.INVALID_UPDATE.value)
            self._error(ErrorCode.INVALID_UPDATE, exc.message, doc_id)
        except FieldsyncError as exc:
            self.replicator.observer.refused(exc.code.value)
            log.debug("refused: %s %s", exc.code.value, exc.message)
            self._error(exc.code, exc.message, doc_id, **exc.detail)
            if exc.code in _RESET_ON:
                self.reset(doc_id, exc.code.value)

    async def _update(self, doc_id: str, update: bytes) -> None:
        room = await self._subscribe(doc_id)
        submitted = await self._write(room, update)
        before, after = submitted.before, submitted.state_vector
        committed = submitted.committed
        if committed is None:
            self._ack(doc_id, room.seq, update, before, after)
        else:
            committed.add_done_callback(
                lambda done: self._acked(doc_id, room, update, before, after, done)
            )

    def _acked(
        self,
        doc_id: str,
        room: Room,
        update: bytes,
        before: bytes,
        after: bytes,
        done: asyncio.Future[Committed],
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            self._error(
                ErrorCode.STORAGE_UNAVAILABLE, "the update was not stored; resend it", doc_id
            )
            return
        self._ack(doc_id, done.result().seq, update, before, after)

    def _ack(self, doc_id: str, seq: int, update: bytes, before: bytes, after: bytes) -> None:
        """`clock` gives, for each Yjs client id in the update, the clock the server holds
        durably, so a device knows exactly which of its edits it may forget.

        `get_state(update)` names only the clients whose structs in the update start at clock 0
        (as Yjs' `encodeStateVectorFromUpdate` does): every incremental edit would get an empty
        clock. So the clients the update advanced in the room (`before` -> `after`) are named
        too; and when it advanced none (a resend of what the room holds: the device reconnected
        while its first send was on the way, and that send's ack went to the closed socket),
        every client, or the device would never forget the edit. `after` is durable by now."""
        ours = state_entries(after)
        resent = after == before
        advanced = dict(ours) if resent else dict(ours.items() - state_entries(before).items())
        for client in state_entries(get_state(update)):
            advanced.setdefault(client, ours.get(client, b"\x00"))
        clocks = sorted(
            (varuint_value(client), varuint_value(clock)) for client, clock in advanced.items()
        )
        clock = {str(client): value for client, value in clocks}
        self.send_control({"type": "ack", "doc": doc_id, "seq": seq, "clock": clock})
