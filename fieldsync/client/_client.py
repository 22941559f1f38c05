"""A device: pycrdt documents kept offline in a local SQLite file, synced with a fieldsync server
over one `fieldsync.v1` WebSocket whenever there is a network."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
import zstandard
from pycrdt import Doc, TransactionEvent

from fieldsync import __version__
from fieldsync.client._local import Held, LocalStore
from fieldsync.errors import CloseCode
from fieldsync.replication import (
    Control,
    DocMessage,
    SyncStep,
    YSync,
    decode_frame,
    decode_state_vector,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
)

log = logging.getLogger(__name__)

TokenSource = str | Callable[[], Awaitable[str]]
Event = Literal["scope", "reset", "error"]

# Close codes after which reconnecting cannot help: the user or the app must act.
_FATAL = {
    CloseCode.FORBIDDEN,
    CloseCode.UPGRADE_REQUIRED,
}


def _safe(exc: BaseException) -> str:
    """An error as a log may show it. The repr of an aiohttp response error holds the request's
    headers, and with them the bearer token: keep its status and message only."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.status} {exc.message}"
    return repr(exc)


# Reset reasons that mean the device's own edit was refused: applying it again cannot help.
_REFUSED = frozenset({"forbidden", "forbidden_field", "invalid_update", "doc_too_large"})


class Fatal(Exception):
    """The server refused this device for good (e.g. sign in again, upgrade the app)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass
class Traffic:
    """Bytes on the wire, and what they would have been without zstd."""

    sent: int = 0
    received: int = 0
    received_uncompressed: int = 0
    frames_received: int = 0


@dataclass
class Backoff:
    """Exponential backoff with full jitter, so a fleet coming back after an outage spreads out."""

    base: float = 0.2
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Client:
    """Documents by id (`doc(id)`); edits are queued locally until the server acknowledges
    them durably, and sync whenever the device is online.

    `url` is one server's `/v1/sync` URL, or several: the nodes of a cluster. The client then
    connects to one, and whenever its connection fails or ends it moves on to the next (after
    the jittered backoff): the load balancer a fleet of such clients needs no other."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: TokenSource,
        *,
        path: Path | None = None,
        device_id: str | None = None,
        platform: str = "python",
        version: str = __version__,
        compress: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("give at least one server URL")
        # Devices of a fleet start on different nodes; each then goes round the list.
        self._node = random.randrange(len(self.urls))
        self.connections = 0  # sessions opened (welcomed), on any node
        self._token = token
        self._held_token: str | None = None  # the token the open socket was last given
        self.local = LocalStore(path)
        self.device_id = device_id or self.local.get_meta("device_id") or uuid.uuid4().hex
        self.local.set_meta("device_id", self.device_id)
        self.platform = platform
        self.version = version
        self.compress = compress
        self.backoff = backoff or Backoff()
        self.traffic = Traffic()
        self.docs: dict[str, Doc[Any]] = {}
        self.synced: dict[str, asyncio.Event] = {}
        self.errors: list[dict[str, Any]] = []
        self.resets: list[dict[str, Any]] = []
        self.rejected: list[tuple[str, str, bytes]] = []  # (doc, reason, update) refused edits
        # Edits held through a reset, to apply again once resynced (kept in the local store too).
        self._reapply: dict[str, list[Held]] = self.local.held()
        self.scope_changes: list[dict[str, Any]] = []
        self._handlers: dict[Event, list[Callable[[dict[str, Any]], object]]] = {}
        self.fatal: Fatal | None = None
        self.last_close: tuple[int, str] | None = None
        self._retry_after: float | None = None  # from a draining server
        self.since = int(self.local.get_meta("since") or 0)
        # Who the server said this device's user is, kept for offline starts: the name and role
        # for log entries (`documents.work_order.set_status(doc, s, by=subject, role=role)`).
        known = orjson.loads(self.local.get_meta("principal") or "{}")
        self.subject: str | None = known.get("subject")
        self.roles: list[str] = list(known.get("roles", []))
        self.caught_up = asyncio.Event()
        self.connected = asyncio.Event()
        self._ack_arrived = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._online = False
        self._remote = False
        self._compressor = zstandard.ZstdCompressor(level=3) if compress else None
        # Documents listed by `changes` and not yet synced; `since` waits for them.
        self._catching_up: dict[str, None] | None = None
        self._catch_up_to = self.since
        self._changed: list[tuple[str, bytes, bool]] = []
        self._seen: dict[str, dict[int, int]] = {}  # state vector at the last flush, per doc
        self._resynced: set[str] = set()  # documents whose resync went out on this connection
        self._durable: dict[str, dict[int, int]] = {}  # what the server holds durably, per doc
        self._more_changes = False
        for doc_id, state in self.local.docs().items():
            self._open(doc_id, state)
        for doc_id in self._reapply.keys() - self.docs.keys():
            self._open(doc_id, None)  # reset before a crash or a restart: it resyncs now

    # --- documents ----------------------------------------------------------------------

    def doc(self, doc_id: str) -> Doc[Any]:
        """The local replica of `doc_id`, created empty if the device has none; it syncs
        whenever the device is online."""
        if doc_id not in self.docs:
            self._open(doc_id, None)
            self._send([self._step1(doc_id)])
        return self.docs[doc_id]

    def _open(self, doc_id: str, state: bytes | None) -> Doc[Any]:
        doc: Doc[Any] = Doc()
        if state:
            doc.apply_update(state)
        doc.observe(lambda event: self._on_change(doc_id, event))
        self.docs[doc_id] = doc
        self._seen[doc_id] = decode_state_vector(doc.get_state())
        self.synced.setdefault(doc_id, asyncio.Event())
        return doc

    def _on_change(self, doc_id: str, event: TransactionEvent) -> None:
        # The transaction still holds the document: persist and send right after it.
        if not self._changed:
            asyncio.get_running_loop().call_soon(self._flush_changes)
        self._changed.append((doc_id, event.update, self._remote))

    def _flush_changes(self) -> None:
        changed, self._changed = self._changed, []
        bodies = []
        for doc_id, update, remote in changed:
            doc = self.docs.get(doc_id)
            if doc is None:
                continue
            state = decode_state_vector(doc.get_state())
            seen = self._seen.get(doc_id, {})
            self._seen[doc_id] = state
            if remote:
                self.local.save(doc_id, doc.get_update(), None, {})
                continue
            # What this edit added, by client id (`get_state(update)` would name only clients
            # whose structs start at clock 0). A delete-only edit adds no clock: the next ack of
            # the document clears it. Either way the local document keeps the edit, and every
            # reconnect sends the server all it lacks, delete set included.
            added = {
                client: clock for client, clock in state.items() if clock > seen.get(client, 0)
            }
            self.local.save(doc_id, doc.get_update(), update, added)
            # Until this connection's resync of the document has gone out, an edit may build on
            # one the server never got: the resync (our SyncStep2) carries it instead.
            if doc_id in self._resynced:
                bodies.append(encode_body(DocMessage(doc_id, encode_sync(SyncStep.UPDATE, update))))
        if bodies:
            self._send(bodies)

    def pending(self, doc_id: str | None = None) -> int:
        """Local edits the server has not yet acknowledged as durable."""
        if self._changed:
            self._flush_changes()  # edits of this loop turn are queued on the next otherwise
        # Edits held through a reset are applied again once the document has resynced: until
        # then they are held apart from the pending ones, and still not acknowledged.
        kept = sum(len(u) for d, u in self._reapply.items() if doc_id in (None, d))
        return self.local.pending(doc_id) + kept

    async def wait_acked(self, doc_id: str | None = None, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while self.pending(doc_id):
                self._ack_arrived.clear()
                await self._ack_arrived.wait()

    async def wait_synced(self, doc_id: str, timeout: float = 30.0) -> None:
        """Until `doc_id` has synced, through any reset meanwhile (which syncs a new copy)."""
        self.doc(doc_id)
        async with asyncio.timeout(timeout):
            while not (synced := self.synced.get(doc_id)) or not synced.is_set():
                if synced is None:
                    raise LookupError(f"{doc_id} was dropped: out of the scope, or refused")
                await synced.wait()

    # --- connection ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server URL this client connects to now (next time, when offline)."""
        return self.urls[self._node]

    async def start(self) -> None:
        """Go online: connect, and reconnect with jittered backoff whenever the link drops."""
        self._online = True
        self.caught_up.clear()
        if self._http is None:
            self._http = aiohttp.ClientSession()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name=f"client-{self.device_id}")

    async def go_offline(self) -> None:
        """Drop the connection and stay offline (edits keep queuing locally)."""
        self._online = False
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        self.connected.clear()

    async def close(self) -> None:
        await self.go_offline()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self.local.close()

    async def _token_value(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def _run(self) -> None:
        assert self._http is not None
        while self._online:
            try:
                await self._session(self._http)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("device %s: connection failed: %s", self.device_id, _safe(exc))
            except Fatal as exc:
                self.fatal = exc
                self._online = False
                break
            self.connected.clear()
            # Whatever ended the session (a node that died, drains, or refused the connection),
            # the next attempt goes to the next node.
            self._node = (self._node + 1) % len(self.urls)
            code = self.last_close[0] if self.last_close else None
            if code == CloseCode.DRAINING:
                self.backoff.reset()
                # The draining server said when to come back (to it or another node).
                if self._retry_after is not None:
                    await asyncio.sleep(self._retry_after)
                    self._retry_after = None
                    continue
            await asyncio.sleep(self.backoff.next())

    async def _session(self, http: aiohttp.ClientSession) -> None:
        self._held_token = await self._token_value()
        headers = {"Authorization": f"Bearer {self._held_token}"}
        async with http.ws_connect(self.url, headers=headers, max_msg_size=0) as ws:
            self._ws = ws
            self._resynced.clear()
            self.caught_up.clear()
            hello = {
                "type": "hello",
                "client": {
                    "platform": self.platform,
                    "version": self.version,
                    "device_id": self.device_id,
                },
                "since": self.since,
                "caps": ["zstd", "batch"] if self.compress else ["batch"],
            }
            # Offer every local document at once: the server answers with what we lack and
            # asks for what it lacks, so offline edits flow up in the same exchange.
            bodies = [encode_body(Control(hello))]
            bodies += [self._step1(doc_id) for doc_id in self.docs]
            await self._send_now(bodies)
            reason = ""
            while True:
                message = await ws.receive()
                if message.type is aiohttp.WSMsgType.BINARY:
                    await self._receive(message.data)
                elif message.type is aiohttp.WSMsgType.CLOSE:
                    reason = str(message.extra or "")
                    break
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
            self._ws = None
            self.last_close = (ws.close_code or 0, reason)
            self._closed(ws.close_code or 0)

    def _closed(self, code: int) -> None:
        reason = self.last_close[1] if self.last_close else ""
        if code in _FATAL or (code == CloseCode.UNAUTHORIZED and reason == "reauthenticate"):
            raise Fatal(code, reason)

    def _step1(self, doc_id: str) -> bytes:
        sv = self.docs[doc_id].get_state()
        return encode_body(DocMessage(doc_id, encode_sync(SyncStep.STEP1, sv)))

    def _send(self, bodies: list[bytes]) -> None:
        if self._ws is not None and not self._ws.closed:
            task = asyncio.ensure_future(self._send_now(bodies))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _send_now(self, bodies: list[bytes]) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        frame = encode_frame(bodies, compressor=self._compressor)
        self.traffic.sent += len(frame)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(frame)

    # --- incoming -----------------------------------------------------------------------

    async def _receive(self, frame: bytes) -> None:
        self.traffic.received += len(frame)
        self.traffic.frames_received += 1
        messages = decode_frame(frame, max_frame=1 << 30, max_body=1 << 30)
        self.traffic.received_uncompressed += sum(len(encode_body(m)) for m in messages) + 1
        replies: list[bytes] = []
        for message in messages:
            if isinstance(message, Control):
                replies += await self._control(message.body)
            else:
                replies += self._doc_message(message)
        if replies:
            await self._send_now(replies)

    async def _control(self, body: dict[str, Any]) -> list[bytes]:
        kind = body.get("type")
        if kind == "welcome":
            principal = body.get("principal") or {}
            self.subject = principal.get("subject", self.subject)
            self.roles = list(principal.get("roles", self.roles))
            self.local.set_meta("principal", orjson.dumps(principal).decode())
            self.connections += 1
            self.connected.set()
            self.backoff.reset()
        elif kind == "changes":
            return self._changes(body)
        elif kind == "ack":
            await self._ack(body["doc"], body.get("clock") or {})
        elif kind == "scope":
            self.scope_changes.append(body)
            for doc_id in body.get("removed", []):
                self._forget(doc_id)
            added = [d for d in body.get("added", []) if d not in self.docs]
            for doc_id in added:
                self._open(doc_id, None)
            self._emit("scope", body)
            return [self._step1(doc_id) for doc_id in added]
        elif kind == "reset":
            self.resets.append(body)
            replies = self._reset(body["doc"], str(body.get("reason", "")))
            self._emit("reset", body)
            return replies
        elif kind == "error":
            self.errors.append(body)
            retry_after = body.get("retry_after")
            if body.get("code") == "draining" and isinstance(retry_after, int | float):
                self._retry_after = min(max(float(retry_after), 0.0), 60.0)
            self._emit("error", body)
        elif kind == "auth_expiring" and not isinstance(self._token, str):
            token = await self._token()
            if token == self._held_token:
                # Not renewed yet: sent again, it would be answered with the same notice at
                # once, in a loop. The socket closes at expiry and the reconnect asks again.
                return []
            self._held_token = token
            return [encode_body(Control({"type": "auth", "token": token}))]
        return []

    def on(self, event: Event, handler: Callable[[dict[str, Any]], object]) -> None:
        """Call `handler` with each `scope`, `reset` or `error` message once the client has
        acted on it (the document dropped or resyncing, its edits held)."""
        self._handlers.setdefault(event, []).append(handler)

    def _emit(self, event: Event, body: dict[str, Any]) -> None:
        for handler in self._handlers.get(event, ()):
            handler(body)

    def _changes(self, body: dict[str, Any]) -> list[bytes]:
        """Sync every listed document; `since` moves to `upto` only once all of them are
        synced, so a crash in between never skips a change."""
        for doc_id in body.get("removed", []):
            self._forget(doc_id)
        wanted = [d["id"] for d in body.get("docs", [])]
        if self._catching_up is None:
            self._catching_up = {}
        for doc_id in wanted:
            self._catching_up[doc_id] = None
            if doc_id in self.docs:
                self.synced[doc_id].clear()
            else:
                self._open(doc_id, None)
        self._catch_up_to = body["upto"]
        self._more_changes = bool(body.get("more", False))
        self._advance()
        return [self._step1(doc_id) for doc_id in wanted]

    def _advance(self) -> None:
        if self._catching_up is None or self._catching_up or self._more_changes:
            return
        self._catching_up = None
        self.since = self._catch_up_to
        self.local.set_meta("since", str(self.since))
        self.caught_up.set()

    def _doc_message(self, message: DocMessage) -> list[bytes]:
        doc_id = message.doc
        doc = self.docs.get(doc_id)
        if doc is None:
            return []
        y = decode_y(message.message)
        if not isinstance(y, YSync):
            return []
        if y.step is SyncStep.STEP1:
            # The server's state vector is durable (see `Replicator.durable_state_vector`).
            clock = {str(k): v for k, v in decode_state_vector(y.payload).items()}
            self._notify_acked(doc_id, clock)
            if self._changed:
                self._flush_changes()  # edits so far go into the diff, not after it
            diff = doc.get_update(y.payload)
            self._resynced.add(doc_id)
            return [encode_body(DocMessage(doc_id, encode_sync(SyncStep.STEP2, diff)))]
        if self._changed:
            self._flush_changes()  # local edits first: they must not be taken for remote ones
        self._remote = True
        try:
            doc.apply_update(y.payload)
        finally:
            self._remote = False
        self._flush_changes()
        if y.step is SyncStep.STEP2:
            held = self._reapply.pop(doc_id, [])
            for update, _ in held:
                doc.apply_update(update)  # as local edits: queued and sent again
            if held:
                self._flush_changes()  # pending in the local store before they stop being held
                self._hold(doc_id, _waiting(doc, held))
            self.synced[doc_id].set()
            if self._catching_up is not None and doc_id in self._catching_up:
                del self._catching_up[doc_id]
                self._advance()
            return []
        return self._taken_in(doc_id, doc)

    def _taken_in(self, doc_id: str, doc: Doc[Any]) -> list[bytes]:
        """Held edits that the server's last update let the document take in (they build on a
        replica's edit that reached this device before it was stored, and was not stored when
        the reset came): the server lacks them, so they are pending again and sent."""
        held = self._reapply.get(doc_id)
        if not held or not self.synced[doc_id].is_set():
            return []  # nothing held, or the resync that applies them again is still to come
        waiting = _waiting(doc, held)
        taken = [entry for entry in held if entry not in waiting]
        for update, sv in taken:
            self.local.save(doc_id, doc.get_update(), update, sv)
        del self._reapply[doc_id]
        self._hold(doc_id, waiting)
        if doc_id not in self._resynced:
            return []  # the resync's diff carries them
        return [encode_body(DocMessage(doc_id, encode_sync(SyncStep.UPDATE, u))) for u, _ in taken]

    def _hold(self, doc_id: str, held: list[Held]) -> None:
        if held:
            self._reapply[doc_id] = held
        self.local.hold(doc_id, held)

    async def _ack(self, doc_id: str, clock: dict[str, int]) -> None:
        self._notify_acked(doc_id, clock)

    def _notify_acked(self, doc_id: str, clock: dict[str, int]) -> None:
        durable = self._durable.setdefault(doc_id, {})
        for client, value in clock.items():
            if value > durable.get(int(client), 0):
                durable[int(client)] = value
        self.local.acknowledge(doc_id, durable)
        self._ack_arrived.set()

    def _reset(self, doc_id: str, reason: str) -> list[bytes]:
        """The server told this device to drop its copy. Edits the server refused (outside the
        scope, fields the role may not write, undecodable, too large) go to `rejected` for the
        app to show; after any other reset (the server lost its copy in memory, the device was
        offline too long) the unacknowledged edits are applied again on top of the server's
        state, so no field work is lost."""
        # With the edits of an earlier reset still waiting for their resync: a second reset
        # before it (updates in flight when the first came) must not drop them.
        kept = self._reapply.pop(doc_id, []) + self.local.pending_updates(doc_id)
        refused = reason in _REFUSED
        # Held in the local store, not only here: a crash before the resync keeps them.
        self._forget(doc_id, hold=() if refused else kept)
        if refused:
            self.rejected.extend((doc_id, reason, update) for update, _ in kept)
            return []
        self._open(doc_id, None)
        self._reapply[doc_id] = kept
        return [self._step1(doc_id)]

    def _forget(self, doc_id: str, hold: Sequence[Held] = ()) -> None:
        self.docs.pop(doc_id, None)
        dropped = self.synced.pop(doc_id, None)
        if dropped is not None:
            dropped.set()  # wakes `wait_synced`, which waits on the next copy's, if any
        self._resynced.discard(doc_id)
        self._seen.pop(doc_id, None)
        self._durable.pop(doc_id, None)
        self.local.forget(doc_id, hold)
        if self._catching_up is not None and doc_id in self._catching_up:
            del self._catching_up[doc_id]
            self._advance()


def _waiting(doc: Doc[Any], held: list[Held]) -> list[Held]:
    """The held edits `doc` has not taken in: their clocks are beyond its state vector (Yjs
    keeps an edit whose predecessor it lacks aside, unapplied)."""
    state = decode_state_vector(doc.get_state())
    return [(u, sv) for u, sv in held if any(state.get(c, 0) < end for c, end in sv.items())]
