"""Node-to-node links (cluster mode): a node serves its devices a document that another node owns
through that node, so the document's room, rules and commits stay on its owner.

One WebSocket per ordered pair of nodes, opened by the node that needs the other's documents
(`NodeLink`) to the owner's cluster listener (`Cluster.accept`), authenticated by the cluster's
shared secret (a bearer token compared in constant time, never logged). It is multiplexed: each
message names the requesting node's peer (a device's connection) and the document. The
requesting side forwards what its replicator is asked for a proxy room (the `Owner` protocol):
subscribe (with the peer's principal and origin, which the owner authorises with its own
policy), read, submit, durable state vector, awareness, unsubscribe, a REST creation and a work
order's re-judging. The owner answers each request, reports each accepted update's commit (or
failure) once its commit settles, so the device is acknowledged only for what the owner
stored, and calls the peer back (`send_doc` fan-out, `confirmed`, `rule_violation`, `reset`,
scope changes) through a `LinkPeer`, which its replicator treats as any other peer.

A link that breaks fails what waits on it (`OwnerUnavailable`, or a commit not known to be
stored: the device resends, and a resent update that adds nothing is acknowledged) and resets
every peer served through it; their next subscribe finds the document's owner again, or claims
the lease once it expired.

Why per ordered pair rather than one socket per pair: each side's requests, and the answers to
them, travel on the link that side opened, so two nodes connecting to each other at once need
no rule for which connection wins. Each subscribe, read and write carries the peer's principal
as it is now, so a role the directory took away is taken away on the owner too. A link whose
node reads slower than its messages come is dropped past `_MAX_QUEUED` bytes, as a lost node.

A message is `len:u32 header parts`: the header a JSON object whose `parts` lists the lengths of
the binary parts (updates, state vectors) that follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from fieldsync.auth import Principal, Role
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.records import Origin, ScopeFilter
from fieldsync.replication._peer import Peer
from fieldsync.replication._replicator import (
    Elsewhere,
    OwnerUnavailable,
    Replicator,
    Submitted,
)
from fieldsync.storage import Committed, Lease, StorageError

if TYPE_CHECKING:
    from fieldsync.replication._room import Room

__all__ = ["CLUSTER_PATH", "Cluster", "LinkPeer", "NodeLink"]

log = logging.getLogger(__name__)

CLUSTER_PATH = "/v1/cluster"
_HEARTBEAT = 5.0  # seconds between WebSocket pings: a silent peer node is given up after two
_NODE_HEADER = "X-Fieldsync-Node"
# Bytes a link may queue for a node that reads slower than they come (a slow node, or a slow
# network between the two); past it the link is dropped, as if the node had gone: what waits
# on it fails, its devices resync. Pings do not catch this: they pass the queue.
_MAX_QUEUED = 64 << 20

Message = tuple[dict[str, Any], list[bytes]]


def pack(header: dict[str, Any], *parts: bytes) -> bytes:
    head = orjson.dumps({**header, "parts": [len(part) for part in parts]})
    return len(head).to_bytes(4, "big") + head + b"".join(parts)


def unpack(data: bytes) -> Message:
    size = int.from_bytes(data[:4], "big")
    header: dict[str, Any] = orjson.loads(data[4 : 4 + size])
    parts, at = [], 4 + size
    for length in header.get("parts", ()):
        parts.append(data[at : at + length])
        at += length
    return header, parts


def _principal_out(principal: Principal) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "roles": sorted(role.value for role in principal.roles),
        "team": principal.team,
        "region": principal.region,
        "name": principal.name,
        "expires_at": principal.expires_at,
        "from_directory": sorted(principal.from_directory),
    }


def _acting(peer: Peer) -> dict[str, Any]:
    """Who a request acts as, sent with each read and write: the owner judges it by the
    principal the directory gives the peer now, not by the one it subscribed with."""
    return {"principal": _principal_out(peer.principal), "origin": str(peer.origin)}


def _principal_in(data: dict[str, Any]) -> Principal:
    return Principal(
        data["subject"],
        frozenset(Role(role) for role in data["roles"]),
        data.get("team"),
        data.get("region"),
        data.get("name"),
        data.get("expires_at"),
        frozenset(data.get("from_directory", ())),
    )


def _error_out(exc: FieldsyncError) -> dict[str, Any]:
    return {"code": exc.code.value, "message": exc.message, "detail": exc.detail}


def _error_in(doc_id: str, data: dict[str, Any]) -> FieldsyncError:
    if data.get("not_owner"):
        return OwnerUnavailable(doc_id)
    return FieldsyncError(ErrorCode(data["code"]), data["message"], **data.get("detail", {}))


class _Wire:
    """One WebSocket's outgoing side: messages are queued without suspending (a `Peer`
    callback never does) and sent in order by one task."""

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._out: deque[bytes] = deque()
        self._queued = 0  # bytes in `_out`
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._sender = asyncio.create_task(self._send_all(), name="fieldsync-link-sender")
        self._dropping: asyncio.Task[None] | None = None

    def send(self, header: dict[str, Any], *parts: bytes) -> None:
        if self.ws.closed or self._dropping is not None:
            return
        message = pack(header, *parts)
        self._out.append(message)
        self._queued += len(message)
        if self._queued > _MAX_QUEUED:
            log.warning(
                "link: %d bytes wait for a node that does not read them; the link is dropped",
                self._queued,
            )
            self._out.clear()
            self._queued = 0
            self._dropping = asyncio.create_task(self._drop(), name="fieldsync-link-drop")
            return
        self._ready.set()

    async def _drop(self) -> None:
        """Close the socket; a close stuck behind what the node does not read is cut short,
        which aborts the connection: both sides' receive loops then end, as for a lost node."""
        self._sender.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=1.0)

    async def _send_all(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._out:
                    message = self._out.popleft()
                    self._queued -= len(message)
                    await self.ws.send_bytes(message)
                self._drained.set()

    async def close(self) -> None:
        # What is queued goes out first (a commit's outcome, a reset), for a bounded time: the
        # other side takes whatever does not arrive for not stored, and resyncs.
        if self._out and not self.ws.closed:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._drained.wait()
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender
        if self._dropping is not None:
            await self._dropping
        await self.ws.close()


# --- the owner's side -----------------------------------------------------------------------


class LinkPeer:
    """A peer of another node (one of its device connections), as the owner's replicator sees
    it: what the replicator tells it goes back over the link."""

    def __init__(
        self, wire: _Wire, pid: int, principal: Principal, scope: ScopeFilter, origin: Origin
    ) -> None:
        self._wire = wire
        self.pid = pid
        self.principal = principal
        self.scope = scope
        self.origin = origin
        self.rooms: dict[str, Room] = {}

    def send_doc(self, doc_id: str, message: bytes) -> None:
        self._wire.send({"type": "doc", "peer": self.pid, "doc": doc_id}, message)

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        parts = () if update is None else (update,)
        self._wire.send({"type": "confirmed", "peer": self.pid, "doc": doc_id}, *parts)

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        self._wire.send({"type": "scope_added", "peer": self.pid, "docs": list(doc_ids)})

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        for doc_id in doc_ids:
            self.rooms.pop(doc_id, None)
        self._wire.send({"type": "scope_removed", "peer": self.pid, "docs": list(doc_ids)})

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        header = {"type": "rule_violation", "peer": self.pid, "doc": doc_id, "rule": rule}
        self._wire.send({**header, "detail": detail})

    def reset(self, doc_id: str, reason: str) -> None:
        self.rooms.pop(doc_id, None)
        self._wire.send({"type": "reset", "peer": self.pid, "doc": doc_id, "reason": reason})


class _Accepted:
    """One link another node opened to this one: its requests, run on this node's replicator."""

    def __init__(self, replicator: Replicator, wire: _Wire) -> None:
        self.replicator = replicator
        self.wire = wire
        self.peers: dict[int, LinkPeer] = {}
        self._commits = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def _peer(self, header: dict[str, Any]) -> LinkPeer:
        """The peer a request names; `principal` and `origin`, when given, are its current
        ones (a subscribe sends them)."""
        pid = int(header["peer"])
        peer = self.peers.get(pid)
        if "principal" in header:
            principal = _principal_in(header["principal"])
            origin = Origin.parse(header["origin"])
            scope = self.replicator.policy.scope(principal)
            if peer is None:
                peer = self.peers[pid] = LinkPeer(self.wire, pid, principal, scope, origin)
                self.replicator.peers[peer] = None  # hears of scope changes as any peer
            peer.principal, peer.scope, peer.origin = principal, scope, origin
        if peer is None:
            raise OwnerUnavailable(str(header.get("doc", "")))
        return peer

    def handle(self, header: dict[str, Any], parts: list[bytes]) -> None:
        """Notifications are handled at once, in order; requests each in a task of their own
        (a room being loaded must not hold the other devices' requests back)."""
        op = header.get("op")
        if op == "awareness":
            peer = self.peers.get(int(header["peer"]))
            room = peer.rooms.get(header["doc"]) if peer else None
            if peer is not None and room is not None:
                with contextlib.suppress(FieldsyncError):
                    self.replicator.relay_awareness(peer, room, parts[0])
        elif op == "unsubscribe":
            peer = self.peers.get(int(header["peer"]))
            room = peer.rooms.pop(header["doc"], None) if peer else None
            if peer is not None and room is not None:
                self.replicator.unsubscribe(peer, room)
        elif op == "leave":
            self._leave(int(header["peer"]))
        else:
            task = asyncio.create_task(self._answer(header, parts))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _leave(self, pid: int) -> None:
        peer = self.peers.pop(pid, None)
        if peer is not None:
            self.replicator.leave(peer, list(peer.rooms.values()))
            peer.rooms.clear()

    async def _answer(self, header: dict[str, Any], parts: list[bytes]) -> None:
        reply: dict[str, Any] = {"re": header["id"]}
        out: tuple[bytes, ...] = ()
        try:
            reply, out = await self._run(header, parts, reply)
        except Elsewhere:
            reply["error"] = {"not_owner": True}
        except OwnerUnavailable:
            reply["error"] = {"not_owner": True}
        except FieldsyncError as exc:
            reply["error"] = _error_out(exc)
        except Exception as exc:  # a request's own failure: the link and the others go on
            log.exception("link request %s failed", header.get("op"))
            reply["error"] = _error_out(
                FieldsyncError(ErrorCode.STORAGE_UNAVAILABLE, f"the owner failed: {exc!r}")
            )
        self.wire.send(reply, *out)

    async def _run(
        self, header: dict[str, Any], parts: list[bytes], reply: dict[str, Any]
    ) -> tuple[dict[str, Any], tuple[bytes, ...]]:
        replicator, op, doc_id = self.replicator, header["op"], header.get("doc", "")
        if op == "create":
            principal = _principal_in(header["principal"])
            origin = Origin.parse(header["origin"])
            committed = await replicator.create(doc_id, parts[0], principal, origin)
            return {**reply, "seq": committed.seq}, ()
        peer = self._peer(header)
        if op == "subscribe":
            peer.rooms[doc_id] = await replicator.subscribe_owned(peer, doc_id)
            return reply, ()
        if op == "recheck":
            await replicator.recheck(doc_id, peer)
            return reply, ()
        room = peer.rooms.get(doc_id)
        if room is None:
            raise OwnerUnavailable(doc_id)  # reset meanwhile: the other node subscribes again
        if op == "read":
            return reply, (await replicator.read(peer, room, parts[0]),)
        if op == "durable":
            return reply, (await replicator.durable_state_vector(peer, room),)
        if op == "submit":
            submitted = await replicator.submit(peer, room, parts[0])
            commit = None
            if submitted.committed is not None:
                commit = next(self._commits)
                submitted.committed.add_done_callback(lambda done: self._settled(commit, done))
            reply = {**reply, "commit": commit, "seq": room.seq}
            return reply, (submitted.before, submitted.state_vector)
        raise FieldsyncError(ErrorCode.PROTOCOL_ERROR, f"unknown link request {op!r}")

    def _settled(self, commit: int, done: asyncio.Future[Committed]) -> None:
        if done.cancelled() or done.exception() is not None:
            self.wire.send({"type": "failed", "commit": commit})
        else:
            self.wire.send({"type": "committed", "commit": commit, "seq": done.result().seq})

    async def close(self) -> None:
        for pid in list(self.peers):
            peer = self.peers[pid]
            self._leave(pid)
            self.replicator.peers.pop(peer, None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.wire.close()


# --- the requesting side --------------------------------------------------------------------


class NodeLink:
    """This node's link to node `node` (reached at `url`): an `Owner` for the replicator."""

    def __init__(self, cluster: Cluster, node: str, url: str) -> None:
        self._cluster = cluster
        self.node = node
        self.url = url
        self.closed = False
        self._wire: _Wire | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._receiver: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._requests: dict[int, tuple[str, asyncio.Future[Message]]] = {}  # by id: doc, reply
        self._commits: dict[int, asyncio.Future[Committed]] = {}
        self._pids: dict[Peer, int] = {}
        self._peers: dict[int, Peer] = {}
        self._docs: dict[int, set[str]] = {}  # per peer, the documents it is subscribed to

    async def _connected(self, doc_id: str) -> _Wire:
        async with self._opening:
            if self.closed:
                raise OwnerUnavailable(doc_id)
            if self._wire is not None:
                return self._wire
            try:
                ws = await self._cluster.http.ws_connect(
                    self.url + CLUSTER_PATH,
                    headers={
                        "Authorization": f"Bearer {self._cluster.secret}",
                        _NODE_HEADER: self._cluster.node,
                    },
                    heartbeat=_HEARTBEAT,
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Its type and status only: a refused handshake's repr holds the request's
                # headers, the secret among them.
                status = getattr(exc, "status", "")
                why = f"{type(exc).__name__} {status}".strip()
                # Once per outage: a dead node is asked for by every device of its documents
                # until their leases move.
                first = self.node not in self._cluster.unreachable
                self._cluster.unreachable.add(self.node)
                level = logging.WARNING if first else logging.DEBUG
                log.log(level, "link to node %s (%s) failed: %s", self.node, self.url, why)
                self._gone()
                raise OwnerUnavailable(doc_id) from None
            if self.node in self._cluster.unreachable:
                self._cluster.unreachable.discard(self.node)
                log.info("link to node %s (%s) is back", self.node, self.url)
            self._wire = _Wire(ws)
            self._receiver = asyncio.create_task(self._receive(ws), name="fieldsync-link")
            return self._wire

    async def _request(self, doc_id: str, header: dict[str, Any], *parts: bytes) -> Message:
        wire = await self._connected(doc_id)
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._requests[rid] = (doc_id, future)
        wire.send({**header, "id": rid, "doc": doc_id}, *parts)
        try:
            async with asyncio.timeout(self._cluster.timeout):
                reply, out = await future
        except TimeoutError:
            raise OwnerUnavailable(doc_id) from None
        finally:
            self._requests.pop(rid, None)
        error = reply.get("error")
        if error is not None:
            raise _error_in(doc_id, error)
        return reply, out

    def _pid(self, peer: Peer) -> int:
        pid = self._pids.get(peer)
        if pid is None:
            pid = self._pids[peer] = next(self._ids)
            self._peers[pid] = peer
            self._docs[pid] = set()
        return pid

    # Owner

    async def subscribe(self, peer: Peer, doc_id: str) -> None:
        pid = self._pid(peer)
        header = {"op": "subscribe", "peer": pid, **_acting(peer)}
        request = asyncio.ensure_future(self._request(doc_id, header))
        try:
            # Shielded: a subscription the owner makes after its asker went away (a device
            # that disconnected mid-sync) must be ended, or the owner's room is never idle.
            await asyncio.shield(request)
        except asyncio.CancelledError:
            request.add_done_callback(lambda done: self._abandoned(peer, pid, doc_id, done))
            raise
        except FieldsyncError:
            if not self._docs.get(pid):
                self._forget(peer, pid)
            raise
        self._docs[pid].add(doc_id)

    def _abandoned(self, peer: Peer, pid: int, doc_id: str, done: asyncio.Future[Message]) -> None:
        if not done.cancelled() and done.exception() is None and pid in self._docs:
            self._docs[pid].add(doc_id)
            self.unsubscribe(peer, doc_id)
        elif not self._docs.get(pid):
            self._forget(peer, pid)

    async def read(self, peer: Peer, doc_id: str, state_vector: bytes) -> bytes:
        header = {"op": "read", "peer": self._pid(peer), **_acting(peer)}
        _, parts = await self._request(doc_id, header, state_vector)
        return parts[0]

    async def submit(self, peer: Peer, doc_id: str, update: bytes) -> tuple[Submitted, int]:
        header = {"op": "submit", "peer": self._pid(peer), **_acting(peer)}
        reply, parts = await self._request(doc_id, header, update)
        commit = reply.get("commit")
        committed: asyncio.Future[Committed] | None = None
        if commit is not None:
            committed = asyncio.get_running_loop().create_future()
            self._commits[int(commit)] = committed
        return Submitted(committed, parts[1], parts[0]), int(reply.get("seq") or 0)

    async def durable_state_vector(self, peer: Peer, doc_id: str) -> bytes:
        _, parts = await self._request(doc_id, {"op": "durable", "peer": self._pid(peer)})
        return parts[0]

    def relay_awareness(self, peer: Peer, doc_id: str, payload: bytes) -> None:
        pid = self._pids.get(peer)
        if pid is not None and self._wire is not None:
            self._wire.send({"op": "awareness", "peer": pid, "doc": doc_id}, payload)

    def unsubscribe(self, peer: Peer, doc_id: str) -> None:
        pid = self._pids.get(peer)
        if pid is None:
            return
        docs = self._docs.get(pid, set())
        docs.discard(doc_id)
        if self._wire is not None:
            self._wire.send({"op": "unsubscribe", "peer": pid, "doc": doc_id})
            if not docs:
                self._wire.send({"op": "leave", "peer": pid})
        if not docs:
            self._forget(peer, pid)

    async def create(
        self, doc_id: str, update: bytes, principal: Principal, origin: Origin
    ) -> Committed:
        header = {"op": "create", "principal": _principal_out(principal), "origin": str(origin)}
        reply, _ = await self._request(doc_id, header, update)
        return Committed(int(reply["seq"]))

    async def recheck(self, doc_id: str, author: Peer) -> None:
        header = {
            "op": "recheck",
            "peer": self._pid(author),
            "principal": _principal_out(author.principal),
            "origin": str(author.origin),
        }
        try:
            await self._request(doc_id, header)
        finally:
            pid = self._pids.get(author)
            if pid is not None and not self._docs.get(pid):
                if self._wire is not None:
                    self._wire.send({"op": "leave", "peer": pid})
                self._forget(author, pid)

    def _forget(self, peer: Peer, pid: int) -> None:
        self._pids.pop(peer, None)
        self._peers.pop(pid, None)
        self._docs.pop(pid, None)

    # What the owner sends

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.BINARY:
                    break
                self._dispatch(*unpack(message.data))
        except Exception:
            log.exception("link to node %s failed", self.node)
        finally:
            self._gone()

    def _dispatch(self, header: dict[str, Any], parts: list[bytes]) -> None:
        if "re" in header:
            request = self._requests.get(int(header["re"]))
            if request is not None and not request[1].done():
                request[1].set_result((header, parts))
            return
        kind = header.get("type")
        if kind in ("committed", "failed"):
            committed = self._commits.pop(int(header["commit"]), None)
            if committed is None or committed.done():
                return
            if kind == "committed":
                committed.set_result(Committed(int(header["seq"])))
            else:
                committed.set_exception(StorageError("the owner node did not store the update"))
            return
        peer = self._peers.get(int(header.get("peer", 0)))
        if peer is None:
            return  # it left meanwhile
        doc_id = header.get("doc", "")
        if kind == "doc":
            peer.send_doc(doc_id, parts[0])
        elif kind == "confirmed":
            peer.confirmed(doc_id, parts[0] if parts else None)
        elif kind == "rule_violation":
            peer.rule_violation(doc_id, header["rule"], header["detail"])
        elif kind == "reset":
            peer.reset(doc_id, header["reason"])
        elif kind == "scope_removed":
            docs = list(header["docs"])
            self._cluster.replicator.proxied_scope_removed(peer, docs)
            pid = self._pids.get(peer)
            if pid is not None:
                self._docs.get(pid, set()).difference_update(docs)
            peer.scope_removed(docs)
        elif kind == "scope_added":
            peer.scope_added(list(header["docs"]))

    def _gone(self) -> None:
        """The link is down: fail what waits on it, and resync every peer served through it."""
        if self.closed:
            return
        self.closed = True
        self._cluster.forget(self)
        for doc_id, future in self._requests.values():
            if not future.done():
                future.set_exception(OwnerUnavailable(doc_id))
        for committed in self._commits.values():
            if not committed.done():
                committed.set_exception(StorageError("the owner node became unreachable"))
        self._commits.clear()
        self._pids.clear()
        self._peers.clear()
        self._docs.clear()
        self._cluster.replicator.owner_lost(self)
        wire = self._wire
        if wire is not None:
            self._cluster.spawn(wire.close())

    async def close(self) -> None:
        self._gone()
        receiver = self._receiver
        if receiver is not None:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver


class Cluster:
    """This node's part of the cluster: its links to the other nodes (`Owners` for the
    replicator) and the listener's handler for theirs (`accept`). `secret` authenticates both
    ways; `timeout` bounds each request over a link."""

    def __init__(
        self, replicator: Replicator, node: str, secret: str, *, timeout: float = 30.0
    ) -> None:
        if not secret:
            raise ValueError("a cluster needs a shared secret")
        self.replicator = replicator
        self.node = node
        self.secret = secret
        self.timeout = timeout
        self._links: dict[str, NodeLink] = {}
        self.unreachable: set[str] = set()  # nodes whose last link attempt failed
        self._accepted: set[_Accepted] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        replicator.owners = self

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    def owner(self, lease: Lease) -> NodeLink:
        link = self._links.get(lease.node)
        if link is None or link.closed or link.url != lease.url:
            link = self._links[lease.node] = NodeLink(self, lease.node, lease.url.rstrip("/"))
        return link

    def forget(self, link: NodeLink) -> None:
        if self._links.get(link.node) is link:
            del self._links[link.node]

    def spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """The cluster listener's one route: another node's link, if it holds the secret."""
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.secret}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("refused a link from %s: wrong cluster secret", request.remote)
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse(heartbeat=_HEARTBEAT, max_msg_size=0)
        await ws.prepare(request)
        accepted = _Accepted(self.replicator, _Wire(ws))
        self._accepted.add(accepted)
        try:
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.BINARY:
                    break
                accepted.handle(*unpack(message.data))
        finally:
            self._accepted.discard(accepted)
            await accepted.close()
        return ws

    def routes(self) -> list[web.RouteDef]:
        return [web.get(CLUSTER_PATH, self.accept)]

    async def close(self) -> None:
        for link in list(self._links.values()):
            await link.close()
        for accepted in list(self._accepted):
            await accepted.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
