"""Leases: which node owns each document's room in cluster mode, with a fencing token.

A document's room (merge, rules, history, index) lives on one node at a time, so rules and their
corrections run once (DESIGN.md §8). The node that loads a room claims the document's lease: a
row in PostgreSQL holding the owner, a fencing token and an expiry. A claim succeeds when the
lease is free, expired, or this node's; every claim that succeeds raises the token, even by the
same node (a restarted process must fence its predecessor). The owner renews all its leases in
one statement every `ttl / 3` and releases them when it unloads the room or shuts down (the row
stays, expired, so the next owner's token is higher still). Times are the database's clock, so
the nodes' clocks never need to agree.

**Fencing.** Every update an owner commits carries its token (`Write.fence`); the PostgreSQL
append locks the document's lease row inside the committing transaction and refuses a write
whose token is not the current unexpired one (`LeaseLost`), alone, without failing the rest of
the group commit. A node taking a lease over waits on that lock, so it loads everything the old
owner stored before losing it, and nothing the old owner tries after is stored. The lease
expiry bounds how long a dead owner's documents stay unavailable.

`Leases` is the seam; `PostgresLeases` its implementation. One node on SQLite has no leases: the
replicator, given none, owns every document and its writes carry no token (nothing is added to
SQLite's write path).

Two processes given one node id (a configuration copied to two hosts) would take each other's
documents over and over, each claim fencing the other: safe, but every device of both resyncs
again and again. Each renewal's heartbeat reads the address the registry held before it; another
address there means another process renewed as this node since, which is logged as an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from psycopg import AsyncConnection

from fieldsync.storage._sqlite import StorageError

if TYPE_CHECKING:
    from fieldsync.storage._postgres import PostgresStore

__all__ = ["Lease", "LeaseLost", "Leases", "PostgresLeases"]


class LeaseLost(StorageError):
    """A write refused because its node no longer holds the document's lease: another node
    owns the document now (or may take it), and only the owner's writes are stored."""

    def __init__(self, doc: str) -> None:
        super().__init__(f"{doc}: this node no longer holds the document's lease")
        self.doc = doc


@dataclass(frozen=True, slots=True)
class Lease:
    """A document's lease as it stands: its holder (`ours` when it is this node), the holder's
    address for other nodes (`url`, from the node registry) and its fencing token."""

    doc: str
    node: str
    url: str
    token: int
    ours: bool


class Leases(Protocol):
    """One node's leases. `open()` registers the node (its id and URL, for the others to reach
    it); `close()` releases every lease it holds."""

    # Where the other nodes reach this node, registered by `open()` (set before it).
    url: str

    @property
    def node(self) -> str: ...

    @property
    def renew_every(self) -> float:
        """Seconds between two `renew()` calls that keep the leases held."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, doc: str) -> Lease:
        """Take `doc`'s lease if it is free, expired or this node's; return the lease as it
        stands after (this node's, or the holder's)."""
        ...

    async def renew(self) -> list[str]:
        """Extend every lease this node holds (and its heartbeat); return the documents whose
        lease it turned out to have lost."""
        ...

    def release(self, docs: Collection[str]) -> Coroutine[Any, Any, None]:
        """Give these leases up at once (a claim from now on asks the database again); the
        coroutine returned records them as expired there, for the other nodes."""
        ...

    def token(self, doc: str) -> int | None:
        """The fencing token of this node's lease on `doc`, None when it holds none."""
        ...


_CLAIM = """
    INSERT INTO leases (doc, node, token, expires_at)
    VALUES (%(doc)s, %(node)s, 1, clock_timestamp() + make_interval(secs => %(ttl)s))
    ON CONFLICT (doc) DO UPDATE SET
        node = excluded.node,
        token = leases.token + 1,
        expires_at = excluded.expires_at
    WHERE leases.node = excluded.node OR leases.expires_at <= clock_timestamp()
    RETURNING token
"""

_HOLDER = """
    SELECT l.node, l.token, coalesce(n.url, '') FROM leases l
    LEFT JOIN nodes n ON n.node = l.node WHERE l.doc = %s
"""

# The leases this node holds with the tokens it holds them by, their rows locked in document order
# as the group commit locks them (`_postgres._current_fences`): no deadlock between the two.
_HELD = """
    SELECT l.doc FROM leases l
    JOIN unnest(%(docs)s::text[], %(tokens)s::bigint[]) AS h(doc, token)
        ON l.doc = h.doc AND l.token = h.token
    WHERE l.node = %(node)s
    ORDER BY l.doc FOR UPDATE OF l
"""

_RENEW = f"""
    UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
    WHERE doc IN ({_HELD})
    RETURNING doc
"""

_HEARTBEAT = """
    INSERT INTO nodes (node, url, heartbeat) VALUES (%s, %s, clock_timestamp())
    ON CONFLICT (node) DO UPDATE SET url = excluded.url, heartbeat = excluded.heartbeat
"""

_RELEASE = f"UPDATE leases SET expires_at = '-infinity' WHERE doc IN ({_HELD})"

# The heartbeat of a renewal, which also says where the registry had this node before it.
_RENEW_HEARTBEAT = """
    WITH before AS (SELECT url FROM nodes WHERE node = %(node)s)
    INSERT INTO nodes (node, url, heartbeat) VALUES (%(node)s, %(url)s, clock_timestamp())
    ON CONFLICT (node) DO UPDATE SET url = excluded.url, heartbeat = excluded.heartbeat
    RETURNING (SELECT url FROM before)
"""
_TWIN_LOG_EVERY = 60.0  # seconds between two errors about another process with this node id

log = logging.getLogger(__name__)


class PostgresLeases:
    """`Leases` in the cluster's PostgreSQL database (`store`'s), for node `node` reached at
    `url`, each lease held `ttl` seconds past its last renewal."""

    def __init__(self, store: PostgresStore, node: str, url: str, ttl: float = 10.0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._store = store
        self._node = node
        self.url = url
        self.ttl = ttl
        self._held: dict[str, int] = {}  # doc -> fencing token
        self._twin_logged = -_TWIN_LOG_EVERY  # monotonic time of the last error about a twin

    @property
    def node(self) -> str:
        return self._node

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    @property
    def held(self) -> dict[str, int]:
        """The documents this node holds, with their tokens (a copy)."""
        return dict(self._held)

    async def open(self) -> None:
        await self._store.run(lambda conn: conn.execute(_HEARTBEAT, (self._node, self.url)))

    async def close(self) -> None:
        await self.release(list(self._held))

    def token(self, doc: str) -> int | None:
        return self._held.get(doc)

    async def claim(self, doc: str) -> Lease:
        held = self._held.get(doc)
        if held is not None:
            return Lease(doc, self._node, self.url, held, True)

        async def work(conn: AsyncConnection) -> Lease | None:
            params = {"doc": doc, "node": self._node, "ttl": self.ttl}
            cursor = await conn.execute(_CLAIM, params)
            row = await cursor.fetchone()
            if row is not None:
                return Lease(doc, self._node, self.url, int(row[0]), True)
            cursor = await conn.execute(_HOLDER, (doc,))
            holder = await cursor.fetchone()
            if holder is None:
                return None  # released and gone between the two statements: claim again
            node, token, url = holder
            return Lease(doc, node, url, int(token), node == self._node)

        for _ in range(3):
            lease = await self._store.run(work)
            if lease is not None:
                if lease.ours:
                    self._held[doc] = lease.token
                return lease
        raise StorageError(f"{doc}: its lease could not be read")

    async def renew(self) -> list[str]:
        sent = dict(self._held)

        async def work(conn: AsyncConnection) -> set[str]:
            cursor = await conn.execute(_RENEW_HEARTBEAT, {"node": self._node, "url": self.url})
            row = await cursor.fetchone()
            self._heard(row[0] if row else None)
            if not sent:
                return set()
            cursor = await conn.execute(
                _RENEW,
                {
                    "ttl": self.ttl,
                    "node": self._node,
                    "docs": list(sent),
                    "tokens": list(sent.values()),
                },
            )
            return {doc for (doc,) in await cursor.fetchall()}

        kept = await self._store.run(work)
        lost = []
        for doc, token in sent.items():
            if doc not in kept and self._held.get(doc) == token:
                del self._held[doc]
                lost.append(doc)
        return lost

    def _heard(self, before: str | None) -> None:
        """`before`: the address the registry held for this node until this heartbeat."""
        now = time.monotonic()
        if before in (None, self.url) or now - self._twin_logged < _TWIN_LOG_EVERY:
            return
        self._twin_logged = now
        log.error(
            "another process runs as node %r, reached at %s (this one: %s): the two take each "
            "other's documents over; give every node its own FIELDSYNC_NODE_ID",
            self._node,
            before,
            self.url,
        )

    def release(self, docs: Collection[str]) -> Coroutine[Any, Any, None]:
        mine = {doc: self._held.pop(doc) for doc in docs if doc in self._held}
        return self._expire(mine)

    async def _expire(self, released: dict[str, int]) -> None:
        if not released:
            return
        params = {"node": self._node, "docs": list(released), "tokens": list(released.values())}
        await self._store.run(lambda conn: conn.execute(_RELEASE, params))
