"""Plain y-websocket: one document per socket, sync and awareness, for stock Yjs providers.

The same replicator, scopes and write path as v1; what y-websocket cannot express (acks, per-doc
errors, resets) becomes a close code.
"""

from __future__ import annotations

from collections.abc import Sequence

from fieldsync.auth import Principal
from fieldsync.errors import CloseCode, ErrorCode, FieldsyncError, ProtocolError
from fieldsync.records import Origin, OriginKind
from fieldsync.replication._codec import (
    EMPTY_UPDATE,
    SyncStep,
    YAwareness,
    YSync,
    decode_y,
    encode_sync,
)
from fieldsync.replication._connection import (
    DEFAULT_LIMITS,
    Connection,
    Limits,
    SubjectSockets,
)
from fieldsync.replication._replicator import Replicator
from fieldsync.replication._room import Room


class YwsSession(Connection):
    def __init__(
        self,
        replicator: Replicator,
        principal: Principal,
        doc_id: str,
        limits: Limits = DEFAULT_LIMITS,
        sockets: SubjectSockets | None = None,
    ) -> None:
        super().__init__(replicator, principal, limits, sockets)
        self.doc_id = doc_id
        self.origin = Origin(OriginKind.YWS, self.id)
        self._room: Room | None = None

    async def open(self) -> None:
        """Authorise the document and greet the client with the server's state vector, as the
        y-websocket server does. Raises `SessionClosed` when the document is not in scope, or
        when the subject holds too many sockets already."""
        if self.closed is not None:
            raise self.closed
        try:
            self._room = await self._subscribe(self.doc_id)
        except FieldsyncError:
            self.close(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN)
        self.replicator.peers[self] = None
        self._schedule_expiry()
        state_vector = await self.replicator.durable_state_vector(self, self._room)
        self.send_doc(self.doc_id, encode_sync(SyncStep.STEP1, state_vector))

    async def receive(self, frame: bytes) -> None:
        self.admit()
        room = self._room
        if room is None or self.doc_id not in self.rooms:
            self.close(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN)
            return
        if len(frame) > self.limits.max_frame:
            self.close(CloseCode.FRAME_TOO_LARGE, ErrorCode.FRAME_TOO_LARGE)
        try:
            y = decode_y(frame)
            if isinstance(y, YSync) and y.step is SyncStep.STEP1:
                update = await self.replicator.read(self, room, y.payload)
                self.send_doc(self.doc_id, encode_sync(SyncStep.STEP2, update))
            elif isinstance(y, YSync) and y.payload != EMPTY_UPDATE:
                await self._write(room, y.payload)
            elif isinstance(y, YAwareness):
                self.replicator.relay_awareness(self, room, y.payload)
        except ProtocolError as exc:
            self.close(CloseCode.PROTOCOL_ERROR, exc.message)
        except FieldsyncError as exc:
            # README: 4403 for what the principal may not do (the document, or a path of it),
            # 4400 for what is invalid.
            refused = exc.code in (ErrorCode.FORBIDDEN, ErrorCode.FORBIDDEN_FIELD)
            self.close(CloseCode.FORBIDDEN if refused else CloseCode.PROTOCOL_ERROR, exc.code)

    # --- Peer ---------------------------------------------------------------------------

    def send_doc(self, doc_id: str, message: bytes) -> None:
        self._queue(message)

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        if update is not None:
            self.send_doc(doc_id, encode_sync(SyncStep.UPDATE, update))

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        pass  # one document per socket: nothing else to offer

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        if self.doc_id in doc_ids:
            self.rooms.pop(self.doc_id, None)
            self.close_soon(CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN)

    def reset(self, doc_id: str, reason: str) -> None:
        # The client must resync from scratch: reconnecting does exactly that.
        self.rooms.pop(doc_id, None)
        self.close_soon(CloseCode.PROTOCOL_ERROR, reason[:100])
