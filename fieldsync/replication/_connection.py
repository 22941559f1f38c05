"""What every replica connection shares, whatever its protocol: an outgoing queue the transport
drains, a close reason, a rate limit, and the token's expiry on a long-lived socket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from fieldsync.auth import Principal
from fieldsync.errors import CloseCode, ErrorCode, FieldsyncError
from fieldsync.rates import TokenBucket
from fieldsync.records import Origin, OriginKind
from fieldsync.replication._replicator import Replicator, Submitted
from fieldsync.replication._room import Room
from fieldsync.storage import Committed

_ids = itertools.count(1)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = 1 << 20  # bytes of one WebSocket message as received
    max_body: int = 8 << 20  # bytes of a body after decompression
    max_doc_bytes: int = 16 << 20
    rate: float = 5_000.0  # messages per second, sustained
    burst: float = 20_000.0
    auth_timeout: float = 10.0
    changes_page: int = 500
    max_in_flight: int = 1_000  # updates applied but not yet committed, per connection
    compress_above: int = 256
    expiry_notice: float = 120.0  # seconds before token expiry that `auth_expiring` is sent
    max_docs: int = 10_000  # documents one connection replicates at once
    max_offline: float = 30 * 86_400.0  # seconds a device may stay away before its copies reset
    max_sockets_per_subject: int = 20  # WebSockets one token subject holds open at once
    # Bytes waiting for a socket that reads slower than its live updates come; past it the
    # connection is dropped, and the device resyncs when it reconnects. Twice the largest
    # document: an answer to one step 1 always fits. (A BATCH's answers are not counted: the
    # device asked for them, and takes them as fast as its link goes.)
    max_queued: int = 32 << 20
    # Refused writes per second a connection may cost, sustained, after five seconds' worth: a
    # refusal is paid for (the document undone, rebuilt as it was), so past it the connection's
    # next message waits. A device back with a backlog of refused edits is slowed, not dropped.
    refusal_rate: float = 20.0


DEFAULT_LIMITS = Limits()


class Transport(Protocol):
    """Where a connection's messages go: an aiohttp `WebSocketResponse`."""

    @property
    def closed(self) -> bool: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, *, code: int, message: bytes) -> bool: ...


# Past this many bytes waiting in the socket's buffer, messages go through the sender task,
# which waits for the buffer to drain (aiohttp's flow control), instead of `_flush`.
_WRITE_NOW_BELOW = 16 << 10


def _websocket_frame(payload: bytes) -> bytes:
    """`payload` as one unmasked binary WebSocket frame, as a server sends it (RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x82, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x82, 126, size)
    else:
        header = struct.pack("!BBQ", 0x82, 127, size)
    return header + payload


class SessionClosed(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SubjectSockets:
    """How many WebSockets each token subject holds open: one stolen or buggy token must not
    hold a thousand (`Limits.max_sockets_per_subject`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()

    def take(self, subject: str) -> bool:
        if self._held[subject] >= self.limit:
            return False
        self._held[subject] += 1
        return True

    def give_back(self, subject: str) -> None:
        self._held[subject] -= 1
        if self._held[subject] <= 0:
            del self._held[subject]


class Connection:
    """Base of the protocol cores. Subclasses implement `receive` and the `Peer` callbacks."""

    def __init__(
        self,
        replicator: Replicator,
        principal: Principal | None,
        limits: Limits,
        sockets: SubjectSockets | None = None,
    ) -> None:
        self.replicator = replicator
        self.limits = limits
        self.id = f"c{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.principal: Principal = principal or Principal("", frozenset())
        self.authenticated = principal is not None
        self.scope = replicator.policy.scope(self.principal)
        # Until `hello` names the device (v1), whose id defaults to this one; yws sets its own.
        self.origin = Origin(OriginKind.DEVICE, self.id)
        self.rooms: dict[str, Room] = {}
        # What an idle socket holds is kept small (S4): a list rather than a deque, a sending
        # task only while there is output, the backpressure queue and the task set made on
        # first use, one expiry timer at a time.
        self._out: list[bytes] = []
        self._out_bytes = 0  # of `_out`
        self._transport: Transport | None = None
        self._socket: asyncio.WriteTransport | None = None  # under `_transport`
        self._flushing = False  # a `_flush` is scheduled for the end of this loop turn
        self._sender: asyncio.Task[None] | None = None  # sends `_out`; exits once it is empty
        self._corked = False  # hold output until the incoming BATCH is handled
        self._closed: SessionClosed | None = None
        self._rate = TokenBucket(limits.rate, limits.burst)
        self._in_flight: deque[asyncio.Future[Committed]] | None = None
        self._refusals: TokenBucket | None = None  # made at the first refusal
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._sockets = sockets
        self._counted: str | None = None  # the subject this socket counts against
        if self.authenticated:
            self._count_socket()

    # --- what each protocol implements (`receive`, and the `Peer` callbacks) --------------

    async def receive(self, frame: bytes) -> None:
        raise NotImplementedError

    def send_doc(self, doc_id: str, message: bytes) -> None:
        raise NotImplementedError

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        raise NotImplementedError

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        raise NotImplementedError

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        raise NotImplementedError

    def reset(self, doc_id: str, reason: str) -> None:
        raise NotImplementedError

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        """Plain y-websocket has no way to say it: its clients just receive the correction."""

    # --- transport side -----------------------------------------------------------------

    def attach(self, transport: Transport, socket: asyncio.WriteTransport | None = None) -> None:
        """Send through `transport` from now on: what is queued, then what comes, then the
        close. Given the `socket` under it, what a loop turn queued is written there at the
        turn's end, in one write (`_flush`), rather than by a sender task woken per burst."""
        self._transport = transport
        self._socket = socket
        self._wake()

    def frames(self, messages: list[bytes]) -> list[bytes]:
        """The WebSocket messages that carry `messages` (queued as they come, by default)."""
        return messages

    async def flushed(self) -> None:
        """Return once what is queued is sent (and the close, once closed)."""
        if self._flushing:
            await asyncio.sleep(0)  # this turn's `_flush` first: it may hand over to the task
        sender = self._sender
        if sender is not None:
            await asyncio.shield(sender)

    def outgoing(self) -> list[bytes]:
        """The WebSocket messages to send now ([] while the output is held for a BATCH)."""
        if not self._ready():
            return []
        bodies, self._out, self._out_bytes = self._out, [], 0
        return self.frames(bodies)

    def _ready(self) -> bool:
        if not self._out:
            return False
        # A cork ends early once a full frame is queued: that bounds memory and the first
        # byte's wait, and few large frames compress better than many small ones.
        full = self._out_bytes >= self.limits.max_frame // 2
        return not self._corked or full or self._closed is not None

    def _wake(self) -> None:
        """Send when there is something to send or the connection closed: while the socket
        takes it, at the end of this loop turn (a live update reaches the other devices
        without waiting for a task, and the acks of one commit leave in one frame); else by
        the sender task, which waits for the socket to drain, and sends the close. An idle
        connection holds no task (S4)."""
        if self._sender is not None or self._transport is None or self._flushing:
            return
        if self._closed is None and self._writable():
            if self._ready():
                self._flushing = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif self._ready() or self._closed is not None:
            self._sender = asyncio.get_running_loop().create_task(self._send(self._transport))

    def _writable(self) -> bool:
        """Whether the socket takes a write now: open, and its buffer not filling up."""
        socket, transport = self._socket, self._transport
        return (
            socket is not None
            and transport is not None
            and not transport.closed
            and not socket.is_closing()
            and socket.get_write_buffer_size() <= _WRITE_NOW_BELOW
        )

    def _flush(self) -> None:
        """Write what this turn queued, as whole WebSocket frames in one write: aiohttp writes
        each of its own frames (pings, pongs, the close) whole and at once too, so none
        interleave."""
        self._flushing = False
        if self._sender is not None:
            return  # the task took over (a close): it sends what is queued, in order
        if self._closed is not None or not self._writable():
            self._wake()
            return
        frames = self.outgoing()
        if frames and self._socket is not None:
            self._socket.write(b"".join(_websocket_frame(frame) for frame in frames))

    async def _send(self, transport: Transport) -> None:
        try:
            while messages := self.outgoing():
                for message in messages:
                    await transport.send_bytes(message)
            closed = self._closed
            if closed is not None and not transport.closed:
                await transport.close(code=closed.code, message=closed.reason.encode()[:120])
        except (ConnectionError, RuntimeError):
            self._transport = None  # the peer went away; the receive loop sees it too
        finally:
            self._sender = None

    @property
    def closed(self) -> SessionClosed | None:
        return self._closed

    def close(self, code: CloseCode, reason: str) -> NoReturn:
        """Mark the connection closed and raise `SessionClosed` for the transport to act on."""
        if self._closed is None:
            self._closed = SessionClosed(code, reason)
            self._wake()
        raise self._closed

    def close_soon(self, code: CloseCode, reason: str) -> None:
        """Close from a callback, where there is no transport call to raise into."""
        with contextlib.suppress(SessionClosed):
            self.close(code, reason)

    def admit(self, messages: int = 1) -> None:
        """Checks every incoming frame passes before it is looked at, and again once decoded:
        a BATCH is charged for every message it carries."""
        if self._closed is not None:
            raise self._closed
        if not self._rate.take(messages):
            self.close(CloseCode.RATE_LIMITED, ErrorCode.RATE_LIMITED)
        if self.authenticated and self._expired():
            self.close(CloseCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED)

    def _count_socket(self) -> None:
        """Count this socket, now authenticated, against its subject's cap; one over it is
        closed (4429 `too_many_connections`) before it replicates anything."""
        if self._sockets is None or self._counted is not None:
            return
        if self._sockets.take(self.principal.subject):
            self._counted = self.principal.subject
        else:
            self.close_soon(CloseCode.RATE_LIMITED, ErrorCode.TOO_MANY_CONNECTIONS)

    def shutdown(self) -> None:
        """The connection is gone: leave every room, stop timers and tasks."""
        if self._closed is None:
            self._closed = SessionClosed(CloseCode.GOING_AWAY, "closed")
        if self._sockets is not None and self._counted is not None:
            self._sockets.give_back(self._counted)
            self._counted = None
        self._wake()
        self.replicator.leave(self, list(self.rooms.values()))
        self.rooms.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sender is not None:
            self._sender.cancel()
        for task in self._tasks or ():
            task.cancel()

    def _queue(self, message: bytes) -> None:
        if self._closed is not None:
            return
        self._out.append(message)
        self._out_bytes += len(message)
        if self._out_bytes > self.limits.max_queued and not self._corked:
            self._too_slow()
            return
        self._wake()

    def _too_slow(self) -> None:
        """The device reads slower than its updates come: drop what waits and the socket (no
        close frame could get past what it has not read). Nothing is lost: its next sync
        sends what its state vector lacks."""
        log.warning(
            "connection %s: %d bytes wait for a socket that does not read them; dropped",
            self.id,
            self._out_bytes,
        )
        self._out, self._out_bytes = [], 0
        self._closed = SessionClosed(CloseCode.GOING_AWAY, "too_slow")
        if self._socket is not None:
            self._socket.abort()
        self._wake()

    def spawn(self, coro: Any) -> None:
        """Run `coro` for as long as the connection lives (cancelled at shutdown)."""
        task = asyncio.create_task(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- rooms and writes ---------------------------------------------------------------

    async def _subscribe(self, doc_id: str) -> Room:
        room = self.rooms.get(doc_id)
        if room is None:
            if len(self.rooms) >= self.limits.max_docs:
                raise FieldsyncError(
                    ErrorCode.RATE_LIMITED,
                    f"{doc_id}: this connection replicates {self.limits.max_docs} documents",
                )
            room = await self.replicator.subscribe(self, doc_id)
            self.rooms[doc_id] = room
        return room

    async def _write(self, room: Room, update: bytes) -> Submitted:
        received = time.perf_counter()
        try:
            submitted = await self.replicator.submit(self, room, update)
        except FieldsyncError:
            await self._refused()
            raise
        committed = submitted.committed
        if committed is not None and not committed.done():
            if self._in_flight is None:
                self._in_flight = deque()
            self._in_flight.append(committed)
            committed.add_done_callback(functools.partial(self._settled, received))
            # Backpressure: a device that outruns the disk waits here instead of filling memory.
            if len(self._in_flight) > self.limits.max_in_flight:
                await asyncio.wait([self._in_flight[0]])
        return submitted

    async def _refused(self) -> None:
        """Charge a refused write; past `Limits.refusal_rate`, wait as long as one costs."""
        rate = self.limits.refusal_rate
        if self._refusals is None:
            self._refusals = TokenBucket(rate, rate * 5)
        if not self._refusals.take():
            await asyncio.sleep((1 - self._refusals.tokens) / rate)
            self._refusals.take()  # the token the wait was for

    def _settled(self, received: float, done: asyncio.Future[Committed]) -> None:
        self.replicator.observer.acknowledged(time.perf_counter() - received)
        in_flight = self._in_flight
        if not in_flight:
            return
        if in_flight[0] is done:
            in_flight.popleft()
        else:
            with contextlib.suppress(ValueError):
                in_flight.remove(done)

    # --- token lifetime -----------------------------------------------------------------

    def _expired(self) -> bool:
        expires = self.principal.expires_at
        return expires is not None and time.time() >= expires

    def _schedule_expiry(self) -> None:
        """The expiry notice, then the close: one timer at a time, the close's set when the
        notice fires (a renewal replaces whichever is pending)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        expires = self.principal.expires_at
        if expires is None:
            return
        notice_in = max(0.0, expires - self.limits.expiry_notice - time.time())
        self._timer = asyncio.get_running_loop().call_later(notice_in, self._notice)

    def _notice(self) -> None:
        self._timer = None
        expires = self.principal.expires_at
        if expires is None:
            return
        self._expiring()
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, expires - time.time()), self._expire
        )

    def _expire(self) -> None:
        self._timer = None
        self.close_soon(CloseCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED)

    def _expiring(self) -> None:
        """Subclasses that can tell the client (v1) do so; plain y-websocket cannot."""
