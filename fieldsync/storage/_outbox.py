"""The outbox (DESIGN.md §7): one entry per committed change of a document an outbound adapter
subscribes to, written in the transaction that commits the change, so an acknowledged update
always has its entries. The runner (`fieldsync.adapters`) reads them back through `Outbox`.

An entry is `pending` until delivered, `delivered` after, `dead` once its delivery failed for
good (its document then waits for an operator: later entries of that document and adapter are
not delivered past it), or `skipped` by an operator. Delivered and skipped entries are kept for
`replay` and purged after the retention period.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlite_utils import Database

if TYPE_CHECKING:  # `_sqlite` imports the migrations, which import SCHEMA from here
    from fieldsync.storage._sqlite import Transaction

_T = TypeVar("_T")

__all__ = [
    "SCHEMA",
    "DueDoc",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxState",
    "OutboxStats",
    "Routes",
    "SQLiteOutbox",
    "write_entries",
]


class OutboxState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class OutboxError:
    """The last error of a delivery: a stable `code`, its `message`, and the target's record it
    is about (`entity`) when known: what an operator needs to act without reading logs."""

    code: str
    message: str
    entity: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    adapter: str
    doc: str
    seq: int
    state: OutboxState
    attempts: int
    created_at: float
    updated_at: float
    next_at: float  # not delivered before this (epoch seconds)
    error: OutboxError | None


@dataclass(frozen=True, slots=True)
class DueDoc:
    """A document with pending entries for `adapter`, all due: they are delivered together as
    the document's latest state. `attempts` is the most any of them has had."""

    adapter: str
    doc: str
    first_seq: int
    last_seq: int
    attempts: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    dead: int
    oldest_pending_at: float | None  # when the oldest pending entry was committed


# Document type ("wo", "form") -> the outbound adapters that receive its changes.
Routes = Mapping[str, Collection[str]]


class Outbox(Protocol):
    """The outbox of a store. Every method is safe to call on the event loop; times are epoch
    seconds passed in by the caller, so that a test can drive them."""

    def route(self, routes: Routes, notify: Callable[[], None] | None = None) -> None:
        """From now on, every committed change of a document of type T writes an entry for each
        adapter of `routes[T]`, except for the changes that adapter made itself (origin
        `adapter:<name>`: an adapter is never sent back what it wrote). `notify` is called on
        the event loop after a commit that wrote entries."""
        ...

    async def due(self, adapter: str, now: float, limit: int) -> list[DueDoc]:
        """Documents whose pending entries for `adapter` are all due at `now`, oldest change
        first; a document with a dead entry for `adapter` is not due (it waits for an
        operator)."""
        ...

    async def next_due(self, adapter: str) -> float | None:
        """When the next pending entry of `adapter` falls due, None when nothing is pending."""
        ...

    async def delivered(self, adapter: str, doc: str, upto_seq: int, now: float) -> int:
        """Mark the pending entries of (`adapter`, `doc`) up to `upto_seq` delivered."""
        ...

    async def failed(
        self, adapter: str, doc: str, upto_seq: int, error: OutboxError, next_at: float, now: float
    ) -> int:
        """Count a failed attempt on those entries, to be tried again from `next_at`."""
        ...

    async def dead_letter(
        self, adapter: str, doc: str, upto_seq: int, error: OutboxError, now: float
    ) -> int:
        """Count a last failed attempt on those entries and set them aside as dead."""
        ...

    async def entries(
        self,
        *,
        adapter: str | None = None,
        state: OutboxState | None = None,
        doc: str | None = None,
        after_id: int | None = None,
        limit: int,
    ) -> list[OutboxEntry]:
        """Entries by id (oldest first) after `after_id`, filtered."""
        ...

    async def entry(self, entry_id: int) -> OutboxEntry | None: ...

    async def retry(self, entry_id: int, now: float) -> OutboxEntry | None:
        """Deliver again, now: the entry and every dead entry of its adapter and document go
        back to pending with no attempts counted (they are one delivery of the document's
        latest state). None when there is no such entry."""
        ...

    async def skip(self, entry_id: int, now: float) -> OutboxEntry | None:
        """Never deliver the entry: it and the pending or dead entries of its adapter and
        document up to its seq are skipped. A delivered entry stays delivered."""
        ...

    async def replay(self, adapter: str, from_seq: int, now: float) -> int:
        """Deliver again every entry of `adapter` from change `from_seq` on, whatever its state
        (a target restored from a backup); the count of entries."""
        ...

    async def stats(self) -> dict[str, OutboxStats]:
        """Per adapter with entries: pending, dead, and the oldest pending entry's time."""
        ...

    async def purge(self, before: float) -> int:
        """Drop delivered and skipped entries last changed before `before`."""
        ...


SCHEMA = (
    # AUTOINCREMENT: an id an operator has seen never names another entry after a purge.
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        adapter TEXT NOT NULL,
        doc TEXT NOT NULL,
        seq INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        next_at REAL NOT NULL,
        error_code TEXT,
        error_message TEXT,
        error_entity TEXT
    )""",
    "CREATE UNIQUE INDEX outbox_key ON outbox (adapter, doc, seq)",
    # The runner's and the operators' questions: what is pending or dead, per adapter.
    "CREATE INDEX outbox_state ON outbox (state, adapter, doc)",
)


def write_entries(db: Database, routes: Routes, doc: str, seq: int, origin: str, at: float) -> bool:
    """In the writer's transaction: the entries of one committed change; True when it wrote any.
    `origin` is the change's origin as text (`str(Origin)`), so an adapter's own change writes
    no entry for it."""
    adapters = routes.get(doc.partition(":")[0], ())
    rows = [(name, doc, seq, at, at, at) for name in adapters if origin != f"adapter:{name}"]
    if rows:
        db.conn.executemany(
            "INSERT INTO outbox (adapter, doc, seq, created_at, updated_at, next_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    return bool(rows)


_COLUMNS = (
    "id, adapter, doc, seq, state, attempts, created_at, updated_at, next_at,"
    " error_code, error_message, error_entity"
)


def _entry(row: Any) -> OutboxEntry:
    (id_, adapter, doc, seq, state, attempts, created, updated, next_at, code, message, entity) = (
        row
    )
    error = OutboxError(code, message or "", entity) if code is not None else None
    return OutboxEntry(
        id_, adapter, doc, seq, OutboxState(state), attempts, created, updated, next_at, error
    )


def _select(db: Database, entry_id: int) -> OutboxEntry | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (entry_id,)).fetchone()
    return _entry(row) if row else None


class _Tables(Protocol):
    """What `SQLiteOutbox` needs of the store (`SQLiteStore` is one)."""

    def set_outbox_routes(
        self, routes: Routes, notify: Callable[[], None] | None = None
    ) -> None: ...

    def transact(self, work: Callable[[Transaction], _T]) -> Awaitable[_T]: ...

    async def query(self, read: Callable[[Database], _T]) -> _T: ...


class SQLiteOutbox:
    """The `Outbox` of a `SQLiteStore`: its writes go through the store's writer (group commit),
    its reads through the store's readers. Works on the database whether or not a server is
    running on it too (WAL: the CLI's operator commands)."""

    def __init__(self, store: _Tables) -> None:
        self._store = store

    def route(self, routes: Routes, notify: Callable[[], None] | None = None) -> None:
        self._store.set_outbox_routes(routes, notify)

    async def due(self, adapter: str, now: float, limit: int) -> list[DueDoc]:
        def read(db: Database) -> list[DueDoc]:
            rows = db.execute(
                """SELECT o.doc, MIN(o.seq), MAX(o.seq), MAX(o.attempts) FROM outbox o
                WHERE o.state = 'pending' AND o.adapter = :adapter
                  AND NOT EXISTS (SELECT 1 FROM outbox d WHERE d.state = 'dead'
                                  AND d.adapter = o.adapter AND d.doc = o.doc)
                GROUP BY o.doc
                -- every entry due: a change committed after a failure waits with the rest
                HAVING MAX(o.next_at) <= :now
                ORDER BY MIN(o.seq) LIMIT :limit""",
                {"adapter": adapter, "now": now, "limit": limit},
            ).fetchall()
            return [
                DueDoc(adapter, doc, first, last, attempts) for doc, first, last, attempts in rows
            ]

        return await self._store.query(read)

    async def next_due(self, adapter: str) -> float | None:
        def read(db: Database) -> float | None:
            (value,) = db.execute(
                """SELECT MIN(due) FROM (
                    SELECT MAX(o.next_at) AS due FROM outbox o
                    WHERE o.state = 'pending' AND o.adapter = ?
                      AND NOT EXISTS (SELECT 1 FROM outbox d WHERE d.state = 'dead'
                                      AND d.adapter = o.adapter AND d.doc = o.doc)
                    GROUP BY o.doc)""",
                (adapter,),
            ).fetchone()
            return None if value is None else float(value)

        return await self._store.query(read)

    async def delivered(self, adapter: str, doc: str, upto_seq: int, now: float) -> int:
        return await self._write(
            """UPDATE outbox SET state = 'delivered', updated_at = :now, error_code = NULL,
                error_message = NULL, error_entity = NULL
            WHERE adapter = :adapter AND doc = :doc AND seq <= :upto AND state = 'pending'""",
            {"adapter": adapter, "doc": doc, "upto": upto_seq, "now": now},
        )

    async def failed(
        self, adapter: str, doc: str, upto_seq: int, error: OutboxError, next_at: float, now: float
    ) -> int:
        return await self._fail(adapter, doc, upto_seq, error, OutboxState.PENDING, next_at, now)

    async def dead_letter(
        self, adapter: str, doc: str, upto_seq: int, error: OutboxError, now: float
    ) -> int:
        return await self._fail(adapter, doc, upto_seq, error, OutboxState.DEAD, now, now)

    async def _fail(
        self,
        adapter: str,
        doc: str,
        upto_seq: int,
        error: OutboxError,
        state: OutboxState,
        next_at: float,
        now: float,
    ) -> int:
        return await self._write(
            """UPDATE outbox SET state = :state, attempts = attempts + 1, next_at = :next_at,
                updated_at = :now, error_code = :code, error_message = :message,
                error_entity = :entity
            WHERE adapter = :adapter AND doc = :doc AND seq <= :upto AND state = 'pending'""",
            {
                "adapter": adapter,
                "doc": doc,
                "upto": upto_seq,
                "state": state.value,
                "next_at": next_at,
                "now": now,
                "code": error.code,
                "message": error.message,
                "entity": error.entity,
            },
        )

    async def entries(
        self,
        *,
        adapter: str | None = None,
        state: OutboxState | None = None,
        doc: str | None = None,
        after_id: int | None = None,
        limit: int,
    ) -> list[OutboxEntry]:
        where: list[str] = ["id > ?"]
        params: list[object] = [after_id or 0]
        for column, value in (("adapter", adapter), ("state", state), ("doc", doc)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)

        def read(db: Database) -> list[OutboxEntry]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                [*params, limit],
            ).fetchall()
            return [_entry(row) for row in rows]

        return await self._store.query(read)

    async def entry(self, entry_id: int) -> OutboxEntry | None:
        return await self._store.query(lambda db: _select(db, entry_id))

    async def retry(self, entry_id: int, now: float) -> OutboxEntry | None:
        def work(txn: Transaction) -> OutboxEntry | None:
            db = txn.db
            entry = _select(db, entry_id)
            if entry is None:
                return None
            db.execute(
                """UPDATE outbox SET state = 'pending', attempts = 0, next_at = :now,
                    updated_at = :now
                WHERE id = :id OR (adapter = :adapter AND doc = :doc AND state = 'dead')""",
                {"id": entry_id, "adapter": entry.adapter, "doc": entry.doc, "now": now},
            )
            # Pending entries of the document waiting out a backoff go along, now.
            db.execute(
                """UPDATE outbox SET next_at = :now
                WHERE adapter = :adapter AND doc = :doc AND state = 'pending'""",
                {"adapter": entry.adapter, "doc": entry.doc, "now": now},
            )
            return _select(db, entry_id)

        return await self._store.transact(work)

    async def skip(self, entry_id: int, now: float) -> OutboxEntry | None:
        def work(txn: Transaction) -> OutboxEntry | None:
            db = txn.db
            entry = _select(db, entry_id)
            if entry is None:
                return None
            db.execute(
                """UPDATE outbox SET state = 'skipped', updated_at = :now
                WHERE adapter = :adapter AND doc = :doc AND seq <= :seq
                  AND state IN ('pending', 'dead')""",
                {"adapter": entry.adapter, "doc": entry.doc, "seq": entry.seq, "now": now},
            )
            return _select(db, entry_id)

        return await self._store.transact(work)

    async def replay(self, adapter: str, from_seq: int, now: float) -> int:
        return await self._write(
            """UPDATE outbox SET state = 'pending', attempts = 0, next_at = :now,
                updated_at = :now
            WHERE adapter = :adapter AND seq >= :from_seq""",
            {"adapter": adapter, "from_seq": from_seq, "now": now},
        )

    async def stats(self) -> dict[str, OutboxStats]:
        def read(db: Database) -> dict[str, OutboxStats]:
            rows = db.execute(
                """SELECT adapter,
                    SUM(state = 'pending'), SUM(state = 'dead'),
                    MIN(CASE WHEN state = 'pending' THEN created_at END)
                FROM outbox WHERE state IN ('pending', 'dead') GROUP BY adapter"""
            ).fetchall()
            return {
                adapter: OutboxStats(int(pending), int(dead), oldest)
                for adapter, pending, dead, oldest in rows
            }

        return await self._store.query(read)

    async def purge(self, before: float) -> int:
        return await self._write(
            "DELETE FROM outbox WHERE state IN ('delivered', 'skipped') AND updated_at < :before",
            {"before": before},
        )

    async def _write(self, sql: str, params: dict[str, object]) -> int:
        def work(txn: Transaction) -> int:
            return int(txn.db.execute(sql, params).rowcount)

        return await self._store.transact(work)
