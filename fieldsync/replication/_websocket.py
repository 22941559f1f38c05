"""The aiohttp side of the replica connections: WebSocket in, protocol core, WebSocket out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping

from aiohttp import WSMsgType, web

from fieldsync import logs
from fieldsync.auth import Principal, Verify, bearer_token
from fieldsync.documents import InvalidDocId, doc_type
from fieldsync.errors import AuthError, CloseCode, ErrorCode
from fieldsync.replication._connection import Connection, Limits, SessionClosed, SubjectSockets
from fieldsync.replication._replicator import Replicator
from fieldsync.replication._session import V1Session
from fieldsync.replication._views import Views
from fieldsync.replication._yws import YwsSession

log = logging.getLogger(__name__)

HEARTBEAT = 30.0
# Seconds a drained device waits before it reconnects: spread, so a node's devices do not all
# land on the others at once.
_RETRY_AFTER = (1.0, 5.0)


class Endpoints:
    """The `/v1/sync` and `/v1/yws/{doc_id}` handlers and the connections they hold."""

    def __init__(
        self,
        replicator: Replicator,
        verify: Verify,
        limits: Limits,
        min_versions: dict[str, str],
        views: Views | None = None,
    ) -> None:
        self.replicator = replicator
        self.views = views
        self.verify = verify
        self.limits = limits
        self.min_versions = min_versions
        self.connections: dict[Connection, web.WebSocketResponse] = {}
        self.sockets = SubjectSockets(limits.max_sockets_per_subject)
        self.draining = False
        self.opened: dict[Connection, float] = {}  # when each connection opened (epoch)

    def _socket(self) -> web.WebSocketResponse:
        # aiohttp's own limit is a backstop (close 1009); frames between the protocol limit and
        # it are refused by the session with 4413, which clients understand.
        return web.WebSocketResponse(
            max_msg_size=self.limits.max_frame * 2, heartbeat=HEARTBEAT, compress=False
        )

    async def sync(self, request: web.Request) -> web.WebSocketResponse:
        ws = self._socket()
        await ws.prepare(request)
        if self.draining:
            await ws.close(code=CloseCode.DRAINING, message=ErrorCode.DRAINING.encode())
            return ws
        try:
            principal = await self._principal(request, query=False)
        except AuthError as exc:
            await ws.close(code=CloseCode.UNAUTHORIZED, message=exc.code.encode())
            return ws
        session = V1Session(
            self.replicator,
            self.verify,
            principal=principal,
            limits=self.limits,
            min_versions=self.min_versions,
            sockets=self.sockets,
            views=self.views,
        )
        # A timer, not a task: an idle socket holds as little as it can (S4).
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.limits.auth_timeout, self._hello_overdue, session)
        try:
            await self._serve(request, ws, session)
        finally:
            deadline.cancel()
        return ws

    @staticmethod
    def _hello_overdue(session: V1Session) -> None:
        if not session.authenticated or session.device_id == "":
            session.close_soon(CloseCode.AUTH_TIMEOUT, ErrorCode.AUTH_TIMEOUT)

    async def _principal(self, request: web.Request, *, query: bool) -> Principal | None:
        """Who the request's bearer token names, None without one; raises `AuthError`. A method
        of its own so that no handler frame holds the token for the socket's lifetime.
        `query`: y-websocket's token query parameter is accepted too (browsers cannot set
        headers on a WebSocket), which the access log never writes (see `fieldsync.app`)."""
        token = bearer_token(request.headers.get("Authorization"))
        if token is None and query:
            token = request.query.get("token") or None
        return None if token is None else await self.verify(token)

    async def yws(self, request: web.Request) -> web.WebSocketResponse:
        ws = self._socket()
        await ws.prepare(request)
        doc_id = request.match_info["doc_id"]
        try:
            doc_type(doc_id)
            principal = await self._principal(request, query=True)
            if principal is None:
                raise AuthError(ErrorCode.REAUTHENTICATE, "no token")
        except InvalidDocId:
            await ws.close(code=CloseCode.PROTOCOL_ERROR, message=b"invalid_doc_id")
            return ws
        except AuthError as exc:
            await ws.close(code=CloseCode.UNAUTHORIZED, message=exc.code.encode())
            return ws
        session = YwsSession(self.replicator, principal, doc_id, self.limits, self.sockets)
        try:
            await session.open()
        except SessionClosed as closed:
            session.shutdown()
            await ws.close(code=closed.code, message=closed.reason.encode())
            return ws
        await self._serve(request, ws, session)
        return ws

    async def _serve(
        self, request: web.Request, ws: web.WebSocketResponse, conn: Connection
    ) -> None:
        logs.bind(session=conn.id, subject=conn.principal.subject or None)
        self.connections[conn] = ws
        self.opened[conn] = time.time()
        socket = request.transport
        conn.attach(ws, socket if isinstance(socket, asyncio.WriteTransport) else None)
        try:
            async for message in ws:
                if message.type is WSMsgType.BINARY:
                    await conn.receive(message.data)
                elif message.type is WSMsgType.TEXT:
                    conn.close(CloseCode.PROTOCOL_ERROR, "binary frames only")
        except SessionClosed:
            pass  # the sender flushes what is queued, then closes with the code
        except Exception:
            log.exception("connection %s failed", conn.id)
            conn.close_soon(CloseCode.PROTOCOL_ERROR, "internal error")
        finally:
            if conn.closed is None:
                conn.close_soon(CloseCode.GOING_AWAY, "closed")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.flushed(), timeout=5)
            conn.shutdown()
            self.connections.pop(conn, None)
            self.opened.pop(conn, None)

    def sessions(self) -> list[dict[str, object]]:
        """Who is connected now: each socket's session, user, device, app and documents."""
        described: list[dict[str, object]] = []
        for conn, opened in list(self.opened.items()):
            v1 = isinstance(conn, V1Session)
            platform, version = conn.client if isinstance(conn, V1Session) else ("y-websocket", "")
            described.append(
                {
                    "id": conn.id,
                    "protocol": "fieldsync.v1" if v1 else "y-websocket",
                    "subject": conn.principal.subject or None,
                    "device": (conn.device_id or None) if isinstance(conn, V1Session) else None,
                    "platform": platform or None,
                    "version": version or None,
                    "connected_at": round(opened, 3),
                    "documents": len(conn.rooms),
                }
            )
        return described

    async def reauthorise(self, updates: Mapping[str, Callable[[Principal], Principal]]) -> int:
        """The directory changed the people of `updates` (subject -> how their principal
        changes): each of their open sessions acts as `update(principal)` from now on, rescoped
        when that changes what it sees, or is closed with 4401 and the code of the `AuthError`
        that `update` raised (a person disabled or deleted). Returns how many were closed."""
        closed = 0
        for conn in list(self.connections):
            update = updates.get(conn.principal.subject) if conn.authenticated else None
            if update is None:
                continue
            try:
                principal = update(conn.principal)
            except AuthError as exc:
                conn.close_soon(CloseCode.UNAUTHORIZED, exc.code)
                closed += 1
                continue
            await self.replicator.reprincipal(conn, principal)
        return closed

    async def drain(self) -> None:
        """Shutting down: tell every device to reconnect elsewhere (4503). A v1 device first
        hears `error draining` with `retry_after`, seconds spread over a few so that the
        devices of this node do not all reconnect to the others at the same instant. Updates
        already applied go on to commit (`Replicator.stop` waits for them); an update the
        socket had not handed over yet is never acknowledged, so its device sends it again."""
        self.draining = True
        for conn in list(self.connections):
            if isinstance(conn, V1Session):
                conn.send_control(
                    {
                        "type": "error",
                        "code": ErrorCode.DRAINING.value,
                        "message": "the server is shutting down: reconnect elsewhere",
                        "retry_after": round(random.uniform(*_RETRY_AFTER), 1),
                    }
                )
            conn.close_soon(CloseCode.DRAINING, ErrorCode.DRAINING)
        if self.connections:
            log.info("draining: %d sockets told to reconnect elsewhere", len(self.connections))
