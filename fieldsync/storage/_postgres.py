"""The PostgreSQL backend's documents and change feed (cluster mode: several nodes, one
database): the update log, snapshots, the index, field history, conflicts and devices.

Writes are group-committed by one writer task per node, on its own connection: it takes every
queued write (up to `batch_max`) into one transaction and resolves their futures once that
transaction has committed, so an ack still means durable. Reads run on a small pool, each in one
REPEATABLE READ transaction (one snapshot). psycopg's async connections never block the loop;
the one CPU-heavy step, merging a document's log into its snapshot, runs in a thread.

**A feed that never skips.** Every stored change gets a number from one gapless sequence, and a
reader pages with "after N". With several writers (nodes), a number drawn by a transaction that
commits after a higher one would be invisible to a reader that has already moved past it, and
missed for good. So the sequence is one row, `change_seq`, that every writing transaction
locks (`SELECT … FOR UPDATE`) before drawing numbers and updates before committing:

- writers that draw numbers serialise on that row, so transactions commit in the order of their
  numbers: PostgreSQL makes a transaction visible before it releases its locks, so the next
  writer draws after the previous one is visible to everyone;
- a reader's snapshot that sees `change_seq = N` therefore sees every change numbered up to N,
  and nothing numbered up to N can commit later: `head()` is N and `changes()` pages up to it;
- numbers stay gapless (a rolled-back batch rolls its numbers back too), as on SQLite.

The price is that the cluster commits one batch at a time: the lock is held from the batch's
first statement to its commit. Group commit amortises it (a batch holds every write its node
queued meanwhile), and writes that draw no number (outbox and attachment bookkeeping, devices'
and compaction's) never take it. The alternative considered, xid8 visibility
(`pg_current_xact_id()` per row, reading only below the snapshot's xmin), lets writers overlap
but makes numbers sparse and holds every reader back behind the oldest open transaction of any
kind. The serial counter is simpler to prove, and measured fast enough: on the loaded 2-core
test machine four nodes group-committed about 1,150 updates/s between them (README,
"PostgreSQL"); a cluster that needs more would move to xid8 visibility behind this same API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar, cast

import orjson
from psycopg import AsyncConnection, AsyncCursor
from psycopg_pool import AsyncConnectionPool

from fieldsync.records import (
    UNOBSERVED,
    DocIndex,
    FieldChange,
    Observer,
    Origin,
    ScopeFilter,
    ScopeKind,
)
from fieldsync.storage import _feed, _outbox
from fieldsync.storage._conflicts import INSERT
from fieldsync.storage._conflicts import row as conflict_row
from fieldsync.storage._leases import LeaseLost
from fieldsync.storage._postgres_migrations import migrate
from fieldsync.storage._sqlite import StorageError, _merge, _new_index
from fieldsync.storage._types import (
    ChangedDoc,
    ChangesPage,
    Committed,
    Conflict,
    ConflictRecord,
    DeviceRecord,
    DeviceSeen,
    FeedPage,
    HistoryEntry,
    ScopeChange,
    StoredDoc,
    Write,
)

__all__ = ["PgTransaction", "PostgresStore"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_READERS = 4
_CONNECT_TIMEOUT = 10.0
_INSERT_CONFLICT = INSERT.replace("?", "%s")  # the SQLite statement, in psycopg's style

_DONE = "('completed', 'closed')"
_ENDED = "('completed', 'closed', 'cancelled')"

_INDEX_COLUMNS = tuple(f.name for f in fields(DocIndex))
_SELECT_INDEX = f"SELECT {', '.join(_INDEX_COLUMNS)} FROM doc_index WHERE doc = %s"
# As SQLite's (`_sqlite._UPSERT_INDEX` with `_screens`' times): the projection, the log's size
# for compaction, and the times the screens' metrics need.
_UPSERT_INDEX = f"""
    INSERT INTO doc_index ({", ".join(_INDEX_COLUMNS)},
                           seq, last_seq, created_seq, log_count, log_bytes,
                           created_at, completed_at, reopened)
    VALUES ({", ".join(f"%({c})s" for c in _INDEX_COLUMNS)}, %(seq)s, %(seq)s, %(seq)s, 1,
            %(bytes)s, %(at)s, CASE WHEN %(status)s IN {_DONE} THEN %(at)s END, 0)
    ON CONFLICT (doc) DO UPDATE SET
        {", ".join(f"{c} = excluded.{c}" for c in _INDEX_COLUMNS[1:])},
        seq = excluded.seq,
        last_seq = excluded.last_seq,
        log_count = doc_index.log_count + 1,
        log_bytes = doc_index.log_bytes + excluded.log_bytes,
        completed_at = CASE WHEN excluded.status IN {_DONE}
            AND coalesce(doc_index.status, '') NOT IN {_DONE} THEN excluded.completed_at
            ELSE doc_index.completed_at END,
        reopened = doc_index.reopened + CASE WHEN coalesce(doc_index.status, '') IN {_DONE}
            AND coalesce(excluded.status, '') NOT IN {_ENDED} THEN 1 ELSE 0 END
    RETURNING log_count, log_bytes
"""

_SCOPE_COLUMNS = {
    ScopeKind.ASSIGNEE: "assignee",
    ScopeKind.TEAM: "team",
    ScopeKind.REGION: "region",
}

# The same queries as SQLite's (`_sqlite`): a document is in a scope through the row its `wo`
# names. LIMIT NULL is no limit.
_CHANGED_ALL = """
    SELECT doc, type, seq FROM doc_index
    WHERE seq > %(since)s AND seq <= %(upto)s
    ORDER BY seq, doc LIMIT %(limit)s
"""
_CHANGED_IN_SCOPE = {
    kind: f"""
    SELECT d.doc, d.type, d.seq FROM doc_index w JOIN doc_index d ON d.wo = w.doc
    WHERE w.{column} = %(value)s AND d.seq > %(since)s AND d.seq <= %(upto)s
    ORDER BY d.seq, d.doc LIMIT %(limit)s
    """
    for kind, column in _SCOPE_COLUMNS.items()
}
_REMOVED_FROM_SCOPE = {
    kind: f"""
    WITH gone AS (
        SELECT DISTINCT h.doc FROM scope_history h
        WHERE h.seq > %(since)s AND h.seq <= %(upto)s AND h.{column} = %(value)s
          AND NOT EXISTS (
              SELECT 1 FROM doc_index d JOIN doc_index w ON w.doc = d.wo
              WHERE d.doc = h.doc AND w.{column} = %(value)s))
    SELECT doc FROM gone
    UNION
    SELECT f.doc FROM gone JOIN doc_index f ON f.wo = gone.doc
    ORDER BY doc
    """
    for kind, column in _SCOPE_COLUMNS.items()
}


@dataclass(frozen=True, slots=True)
class _Append:
    write: Write
    future: asyncio.Future[Committed]
    at: float


@dataclass(frozen=True, slots=True)
class _Touch:
    seen: DeviceSeen
    at: float


@dataclass(frozen=True, slots=True)
class _Call:
    work: Callable[[PgTransaction], Awaitable[Any]]
    future: asyncio.Future[Any]


class _Stop:
    """Queued by `close()`: the writer finishes every job queued before it, then exits."""


def _is_call(job: _Append | _Touch | _Call) -> bool:
    return isinstance(job, _Call)


_Job = _Append | _Touch | _Call | _Stop


class PgTransaction:
    """What a `PostgresStore.transact` job gets: the writer's connection inside the current
    group commit (holding the change sequence), and that sequence to number what it records."""

    def __init__(self, conn: AsyncConnection, seq: int) -> None:
        self.conn = conn
        self.seq = seq

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class PostgresStore:
    """A `Store` in a PostgreSQL database shared by every node (`url`: a libpq connection URI;
    a `search_path` in its `options` places the tables in that schema).

    A document whose update log reaches `compact_after_updates` rows or `compact_after_bytes`
    bytes is compacted into its snapshot after the batch that crossed the line is acknowledged.
    At most `batch_max` queued writes share one transaction."""

    def __init__(
        self,
        url: str,
        *,
        compact_after_updates: int = 500,
        compact_after_bytes: int = 1 << 20,
        batch_max: int = 1000,
        readers: int = _READERS,
        observer: Observer = UNOBSERVED,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self._url = url
        self._compact_after_updates = compact_after_updates
        self._compact_after_bytes = compact_after_bytes
        self._batch_max = batch_max
        self._readers = readers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._conn: AsyncConnection | None = None
        self._pool: AsyncConnectionPool | None = None
        self._commits = 0
        self._observer = observer
        self._outbox_routes: _outbox.Routes = {}
        self._outbox_notify: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return self._url

    # Lifecycle

    async def open(self) -> None:
        if self._writer is not None:
            raise StorageError("the store is already open")
        conn: AsyncConnection | None = None
        pool: AsyncConnectionPool | None = None
        try:
            conn = await self._connect()
            await migrate(conn)
            pool = AsyncConnectionPool(
                self._url,
                min_size=1,
                max_size=self._readers,
                kwargs={"autocommit": True},
                # A connection the server dropped (a restart, a failover) is replaced before a
                # read gets it, rather than failing that read.
                check=AsyncConnectionPool.check_connection,
                open=False,
                name="fieldsync-postgres",
            )
            await pool.open(wait=True, timeout=_CONNECT_TIMEOUT)
        except Exception as exc:
            if conn is not None:
                await conn.close()
            if pool is not None:
                await pool.close()
            # The message leaves the URL out: it may hold a password.
            raise StorageError("cannot open the PostgreSQL database") from exc
        self._loop = asyncio.get_running_loop()
        self._conn, self._pool = conn, pool
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._run_writer(), name="fieldsync-postgres-writer")

    async def close(self) -> None:
        """Commit everything already queued, then close the connections."""
        writer, pool = self._writer, self._pool
        if writer is None or pool is None:
            return
        self._writer = None
        self._queue.put_nowait(_Stop())
        await writer
        self._pool = None
        await pool.close()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connect(self) -> AsyncConnection:
        return await AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=int(_CONNECT_TIMEOUT)
        )

    # Writes

    def append(self, write: Write) -> asyncio.Future[Committed]:
        """See `Store.append`; call it on the loop `open()` ran on."""
        if self._writer is None or self._loop is None:
            raise StorageError("the store is not open")
        if write.index is not None and write.index.doc != write.doc:
            raise ValueError(f"index of {write.index.doc!r} given for {write.doc!r}")
        future: asyncio.Future[Committed] = self._loop.create_future()
        self._queue.put_nowait(_Append(write, future, time.time()))
        return future

    def set_outbox_routes(
        self, routes: _outbox.Routes, notify: Callable[[], None] | None = None
    ) -> None:
        """The outbox hook (`storage.Outbox.route`): from the next batch on, each committed
        update writes the outbox entries of `routes` in its own transaction."""
        self._outbox_notify = notify
        self._outbox_routes = {kind: tuple(names) for kind, names in routes.items()}

    def touch_device(self, seen: DeviceSeen) -> None:
        if self._writer is None:
            raise StorageError("the store is not open")
        self._queue.put_nowait(_Touch(seen, time.time()))

    def transact(self, work: Callable[[PgTransaction], Awaitable[_T]]) -> asyncio.Future[_T]:
        """Run `work` on the writer inside the next group commit (holding the change sequence);
        the future resolves with its result once committed. A job that raises is rolled back
        alone (a savepoint), its future fails, and the rest of the batch commits."""
        if self._writer is None or self._loop is None:
            raise StorageError("the store is not open")
        future: asyncio.Future[_T] = self._loop.create_future()
        self._queue.put_nowait(_Call(work, future))
        return future

    async def run(self, work: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run `work` in a transaction of its own on a pooled connection (READ COMMITTED),
        durable when this returns: for writes that draw no change sequence number."""
        if self._pool is None:
            raise StorageError("the store is not open")
        async with self._pool.connection() as conn, conn.transaction():
            return await work(conn)

    async def query(self, read: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run `read` on a pooled connection in one REPEATABLE READ, read-only transaction
        (one committed snapshot)."""
        if self._pool is None:
            raise StorageError("the store is not open")
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return await read(conn)

    # Reads

    async def load(self, doc: str) -> StoredDoc | None:
        return await self.query(lambda conn: _load(conn, doc))

    async def load_many(self, docs: Sequence[str]) -> dict[str, StoredDoc | None]:
        async def load_each(conn: AsyncConnection) -> dict[str, StoredDoc | None]:
            return {doc: await _load(conn, doc) for doc in docs}

        return await self.query(load_each)

    async def index(self, doc: str) -> DocIndex | None:
        return await self.query(lambda conn: _index(conn, doc))

    async def scope_index(self, doc: str) -> DocIndex | None:
        return await self.query(lambda conn: _scope_index(conn, doc))

    async def changes(self, scope: ScopeFilter, since: int, limit: int) -> ChangesPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self.query(lambda conn: _changes(conn, scope, since, limit))

    async def head(self) -> int:
        return await self.query(head)

    async def follow(self, since: int, limit: int) -> FeedPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self.query(lambda conn: _follow(conn, since, limit))

    async def history(
        self, doc: str, path: str | None, before: tuple[int, int] | None, limit: int
    ) -> list[HistoryEntry]:
        return await self.query(lambda conn: _history(conn, doc, path, before, limit))

    async def last_seen(self, device_id: str, subject: str) -> float | None:
        async def read(conn: AsyncConnection) -> float | None:
            cursor = await conn.execute(
                "SELECT last_seen FROM devices WHERE device_id = %s AND subject = %s",
                (device_id, subject),
            )
            row = await cursor.fetchone()
            return float(row[0]) if row else None

        return await self.query(read)

    async def devices(self, subject: str | None = None, limit: int = 1000) -> list[DeviceRecord]:
        async def read(conn: AsyncConnection) -> list[DeviceRecord]:
            cursor = await conn.execute(
                """SELECT device_id, subject, platform, version, last_seen, last_seq FROM devices
                WHERE %(subject)s::text IS NULL OR subject = %(subject)s
                ORDER BY last_seen DESC LIMIT %(limit)s""",
                {"subject": subject, "limit": limit},
            )
            return [DeviceRecord(*row) for row in await cursor.fetchall()]

        return await self.query(read)

    async def devices_in(self, scope: ScopeFilter, limit: int) -> list[DeviceRecord]:
        return await self.query(lambda conn: _devices_in(conn, scope, limit))

    async def forms(self, wo: str) -> list[str]:
        async def read(conn: AsyncConnection) -> list[str]:
            cursor = await conn.execute(
                "SELECT doc FROM doc_index WHERE wo = %s AND type = 'form' ORDER BY doc", (wo,)
            )
            return [doc for (doc,) in await cursor.fetchall()]

        return await self.query(read)

    def record_conflict(self, conflict: Conflict, fence: int | None = None) -> None:
        async def work(txn: PgTransaction) -> None:
            if fence is not None and not await _holds(txn.conn, conflict.doc, fence):
                _log.info("%s: a stale owner's conflict record left out", conflict.doc)
                return
            await _record_conflict(txn.conn, txn.seq, conflict)

        recorded = self.transact(work)
        recorded.add_done_callback(_log_failure)

    async def conflicts(
        self, scope: ScopeFilter, before_id: int | None, limit: int
    ) -> list[ConflictRecord]:
        return await self.query(lambda conn: _conflicts(conn, scope, before_id, limit))

    async def stats(self) -> dict[str, int]:
        counts = await self.query(_counts)
        return {**counts, "commits": self._commits}

    # The writer task

    async def _run_writer(self) -> None:
        while True:
            batch, stop = await self._take_batch()
            if batch:
                await self._commit_batch(batch)
            if stop:
                return

    async def _take_batch(self) -> tuple[list[_Append | _Touch | _Call], bool]:
        """Wait for one job, then take whatever else is already queued, up to `batch_max`."""
        job = await self._queue.get()
        batch: list[_Append | _Touch | _Call] = []
        while not isinstance(job, _Stop):
            batch.append(job)
            if len(batch) >= self._batch_max:
                return batch, False
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return batch, False
        return batch, True

    async def _writer_conn(self) -> AsyncConnection:
        """The writer's connection, opened again if the last one broke (a restarted server)."""
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        return self._conn

    async def _commit_batch(self, batch: list[_Append | _Touch | _Call]) -> None:
        settled = [job for job in batch if not isinstance(job, _Touch)]
        results: list[Any] = []
        to_compact: set[str] = set()
        routes, outboxed = self._outbox_routes, False
        began = time.perf_counter()
        try:
            conn = await self._writer_conn()
            if not settled:
                # Devices' contacts alone draw no number: no need to queue behind other nodes.
                async with conn.transaction(), conn.pipeline():
                    for job in batch:
                        await _write_device(conn, cast(_Touch, job))
                self._commits += 1
                return
            async with conn.transaction():
                # Serialises the writers of every node (see the module's docstring).
                cursor = await conn.execute("SELECT value FROM change_seq FOR UPDATE")
                ((seq,),) = await cursor.fetchall()
                txn = PgTransaction(conn, seq)
                docs = {job.write.doc for job in batch if isinstance(job, _Append)}
                indexes = await _indexes(conn, docs)
                fences = await _current_fences(conn, batch)
                staged: list[Any] = []
                # Updates are pipelined: their statements go out without waiting for each
                # reply, so the change sequence is held for a few round trips, not a few per
                # write. `transact` jobs run between, outside the pipeline: they read their own
                # statements' results.
                for jobs_are_calls, jobs in itertools.groupby(batch, _is_call):
                    if jobs_are_calls:
                        for job in jobs:
                            staged.append(await _run_isolated(txn, cast(_Call, job)))
                        continue
                    async with conn.pipeline():
                        for job in jobs:
                            if isinstance(job, _Touch):
                                await _write_device(conn, job)
                                continue
                            job = cast(_Append, job)
                            fence = job.write.fence
                            if fence is not None and fences.get(job.write.doc) != fence:
                                # A stale owner's write: refused alone, the batch goes on.
                                staged.append(_Failed(LeaseLost(job.write.doc)))
                                continue
                            staged.append(await _stage_update(conn, job, txn.next_seq(), indexes))
                            if routes and await _write_outbox(conn, routes, job, txn.seq):
                                outboxed = True
                await conn.execute("UPDATE change_seq SET value = %s", (txn.seq,))
                for item in staged:
                    if not isinstance(item, _Staged):
                        results.append(item)
                        continue
                    committed, log_count, log_bytes = await item.settle()
                    results.append(committed)
                    if (
                        log_count >= self._compact_after_updates
                        or log_bytes >= self._compact_after_bytes
                    ):
                        to_compact.add(item.after.doc)
        except Exception as exc:
            _log.warning("rolled back a batch of %d writes", len(settled), exc_info=exc)
            _fail([job.future for job in settled], exc)
            return
        self._commits += 1
        self._observer.committed(len(batch), time.perf_counter() - began)
        _resolve([job.future for job in settled], results)
        if outboxed and self._outbox_notify is not None:
            self._outbox_notify()
        for doc in sorted(to_compact):
            await self._compact(doc)

    async def _compact(self, doc: str) -> None:
        """Fold the document's log into its snapshot: read and merge outside any lock, then
        write it in a short transaction that gives up if another node compacted meanwhile."""
        try:
            snapshot, upto, rows = await self.query(lambda conn: _log_of(conn, doc))
            if not rows:
                return
            parts = ([snapshot] if snapshot is not None else []) + [data for _, data in rows]
            merged = await asyncio.to_thread(_merge, parts)
            last = rows[-1][0]
            conn = await self._writer_conn()
            async with conn.transaction():
                # The index row is what appends to this document lock too: no append of it
                # runs between this check and the commit.
                await conn.execute("SELECT 1 FROM doc_index WHERE doc = %s FOR UPDATE", (doc,))
                cursor = await conn.execute("SELECT upto_seq FROM snapshots WHERE doc = %s", (doc,))
                current = await cursor.fetchone()
                if (current[0] if current else 0) != upto:
                    return  # another node compacted it first
                await conn.execute(
                    """INSERT INTO snapshots (doc, data, upto_seq) VALUES (%s, %s, %s)
                    ON CONFLICT (doc) DO UPDATE SET
                        data = excluded.data, upto_seq = excluded.upto_seq""",
                    (doc, merged, last),
                )
                await conn.execute("DELETE FROM updates WHERE doc = %s AND seq <= %s", (doc, last))
                await conn.execute(
                    """UPDATE doc_index SET log_count = greatest(log_count - %s, 0),
                        log_bytes = greatest(log_bytes - %s, 0) WHERE doc = %s""",
                    (len(rows), sum(len(data) for _, data in rows), doc),
                )
        except Exception:
            # Nothing is lost: the log stays, and the next write to the document tries again.
            _log.exception("compacting %s failed", doc)
            return
        self._commits += 1


# The writer, inside its transaction.


async def _indexes(conn: AsyncConnection, docs: Collection[str]) -> dict[str, DocIndex]:
    cursor = await conn.execute(
        f"SELECT {', '.join(_INDEX_COLUMNS)} FROM doc_index WHERE doc = ANY(%s::text[])",
        (sorted(docs),),
    )
    return {row[0]: DocIndex(*row) for row in await cursor.fetchall()}


async def _current_fences(
    conn: AsyncConnection, batch: Iterable[_Append | _Touch | _Call]
) -> dict[str, int]:
    """The current, unexpired fencing token of each document the batch writes under a lease.
    Their lease rows stay locked until the batch commits (in document order, as renewals lock
    them: no deadlock), so a node taking one over waits, then loads what this batch stored."""
    docs = sorted(
        {job.write.doc for job in batch if isinstance(job, _Append) and job.write.fence is not None}
    )
    if not docs:
        return {}
    cursor = await conn.execute(
        """SELECT doc, token FROM leases
        WHERE doc = ANY(%s::text[]) AND expires_at > clock_timestamp()
        ORDER BY doc FOR UPDATE""",
        (docs,),
    )
    return {doc: int(token) for doc, token in await cursor.fetchall()}


@dataclass(frozen=True, slots=True)
class _Staged:
    """An update whose statements are sent; `settle()` reads their replies."""

    seq: int
    before: DocIndex | None
    after: DocIndex
    index: AsyncCursor[Any]
    forms: AsyncCursor[Any] | None

    async def settle(self) -> tuple[Committed, int, int]:
        ((log_count, log_bytes),) = await self.index.fetchall()
        if self.forms is None:
            return Committed(self.seq), log_count, log_bytes
        forms = tuple(sorted(form for (form,) in await self.forms.fetchall()))
        scope = ScopeChange(self.after.doc, self.before, self.after, forms)
        return Committed(self.seq, scope), log_count, log_bytes


async def _stage_update(
    conn: AsyncConnection, job: _Append, seq: int, indexes: dict[str, DocIndex]
) -> _Staged:
    """Log the update and project it into `doc_index` (`indexes`: the batch's view of it)."""
    write = job.write
    before = indexes.get(write.doc)
    after = indexes[write.doc] = write.index or before or _new_index(write.doc)
    await conn.execute(
        "INSERT INTO updates (seq, doc, data, origin, actor, at) VALUES (%s, %s, %s, %s, %s, %s)",
        (seq, write.doc, write.data, str(write.origin), write.actor, job.at),
    )
    if write.history:
        origin = str(write.origin)
        # In the update's own transaction: the history never lacks a stored change, and never
        # holds one that was not stored.
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO field_history (seq, doc, path, old, new, actor, origin, at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        seq,
                        write.doc,
                        c.path,
                        _json(c.old),
                        _json(c.new),
                        write.actor,
                        origin,
                        job.at,
                    )
                    for c in write.history
                ],
            )
    index = await conn.execute(
        _UPSERT_INDEX,
        {
            **{c: getattr(after, c) for c in _INDEX_COLUMNS},
            "seq": seq,
            "bytes": len(write.data),
            "at": job.at,
        },
    )
    return _Staged(seq, before, after, index, await _move_scope(conn, seq, before, after))


async def _move_scope(
    conn: AsyncConnection, seq: int, before: DocIndex | None, after: DocIndex
) -> AsyncCursor[Any] | None:
    """For a work order created or whose scope changed: the cursor of its forms' move."""
    if after.type != "wo":
        return None
    if before is not None:
        if _scope(before) == _scope(after):
            return None
        await conn.execute(
            "INSERT INTO scope_history (seq, doc, assignee, team, region)"
            " VALUES (%s, %s, %s, %s, %s)",
            (seq, before.doc, *_scope(before)),
        )
    # The forms move with their work order: their feed position jumps to this seq, so a reader
    # whose scope now includes the work order receives forms that did not change themselves.
    return await conn.execute(
        "UPDATE doc_index SET seq = %s WHERE wo = %s AND doc <> wo RETURNING doc", (seq, after.doc)
    )


def _scope(index: DocIndex) -> tuple[str | None, str | None, str | None]:
    return index.assignee, index.team, index.region


async def _write_device(conn: AsyncConnection, job: _Touch) -> None:
    seen = job.seen
    await conn.execute(
        """INSERT INTO devices
            (device_id, subject, platform, version, last_seen, last_seq, team, region)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (device_id) DO UPDATE SET
            subject = excluded.subject, platform = excluded.platform,
            version = excluded.version, last_seen = excluded.last_seen,
            last_seq = excluded.last_seq, team = excluded.team, region = excluded.region""",
        (
            seen.device_id,
            seen.subject,
            seen.platform,
            seen.version,
            job.at,
            seen.last_seq,
            seen.team,
            seen.region,
        ),
    )


_DEVICE_SCOPE = {ScopeKind.ASSIGNEE: "subject", ScopeKind.TEAM: "team", ScopeKind.REGION: "region"}


async def _devices_in(conn: AsyncConnection, scope: ScopeFilter, limit: int) -> list[DeviceRecord]:
    if scope.kind is ScopeKind.NONE:
        return []
    params: list[object] = [limit]
    where = "TRUE"
    if scope.kind is not ScopeKind.ALL:
        where, params = f"{_DEVICE_SCOPE[scope.kind]} = %s", [scope.value, limit]
    cursor = await conn.execute(
        "SELECT device_id, subject, platform, version, last_seen, last_seq, team, region"
        f" FROM devices WHERE {where} ORDER BY last_seen DESC, device_id LIMIT %s",
        params,
    )
    return [DeviceRecord(*row) for row in await cursor.fetchall()]


async def _write_outbox(
    conn: AsyncConnection, routes: _outbox.Routes, job: _Append, seq: int
) -> bool:
    """The outbox entries of one committed change (see `_outbox.write_entries`)."""
    doc, origin = job.write.doc, str(job.write.origin)
    adapters = routes.get(doc.partition(":")[0], ())
    rows = [
        (name, doc, seq, job.at, job.at, job.at) for name in adapters if origin != f"adapter:{name}"
    ]
    if rows:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO outbox (adapter, doc, seq, created_at, updated_at, next_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                rows,
            )
    return bool(rows)


async def _holds(conn: AsyncConnection, doc: str, fence: int) -> bool:
    """Whether `fence` is `doc`'s current, unexpired lease token. Read without a lock: the
    batch's appends lock the rows they check in document order, and a lock taken here, out of
    that order, could deadlock with a renewal; an audit record needs no more."""
    cursor = await conn.execute(
        "SELECT 1 FROM leases WHERE doc = %s AND token = %s AND expires_at > clock_timestamp()",
        (doc, fence),
    )
    return await cursor.fetchone() is not None


async def _record_conflict(conn: AsyncConnection, seq: int, conflict: Conflict) -> None:
    await conn.execute(_INSERT_CONFLICT, conflict_row(seq, conflict))


class _Failed:
    """A `transact` job's own failure, carried to its future after the batch commits."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def _run_isolated(txn: PgTransaction, job: _Call) -> Any:
    seq = txn.seq
    try:
        async with txn.conn.transaction():  # a savepoint
            return await job.work(txn)
    except Exception as exc:
        if txn.conn.broken:
            raise  # the batch cannot commit: every job of it fails
        txn.seq = seq  # numbers drawn by the rolled-back job are given again
        return _Failed(exc)


# Reads, each inside one snapshot.


async def head(conn: AsyncConnection) -> int:
    cursor = await conn.execute("SELECT value FROM change_seq")
    ((seq,),) = await cursor.fetchall()
    return int(seq)


async def _index(conn: AsyncConnection, doc: str) -> DocIndex | None:
    cursor = await conn.execute(_SELECT_INDEX, (doc,))
    row = await cursor.fetchone()
    return DocIndex(*row) if row else None


async def _scope_index(conn: AsyncConnection, doc: str) -> DocIndex | None:
    index = await _index(conn, doc)
    if index is None or index.wo is None:
        return None
    return index if index.wo == doc else await _index(conn, index.wo)


async def _load(conn: AsyncConnection, doc: str) -> StoredDoc | None:
    index = await _index(conn, doc)
    if index is None:
        return None
    cursor = await conn.execute("SELECT last_seq FROM doc_index WHERE doc = %s", (doc,))
    ((last_seq,),) = await cursor.fetchall()
    cursor = await conn.execute("SELECT data, upto_seq FROM snapshots WHERE doc = %s", (doc,))
    snapshot = await cursor.fetchone()
    data, upto = snapshot if snapshot else (None, 0)
    cursor = await conn.execute(
        "SELECT data FROM updates WHERE doc = %s AND seq > %s ORDER BY seq", (doc, upto)
    )
    updates = [update for (update,) in await cursor.fetchall()]
    return StoredDoc(data, updates, last_seq, index)


async def _log_of(
    conn: AsyncConnection, doc: str
) -> tuple[bytes | None, int, list[tuple[int, bytes]]]:
    cursor = await conn.execute("SELECT data, upto_seq FROM snapshots WHERE doc = %s", (doc,))
    snapshot = await cursor.fetchone()
    cursor = await conn.execute("SELECT seq, data FROM updates WHERE doc = %s ORDER BY seq", (doc,))
    rows = [(seq, data) for seq, data in await cursor.fetchall()]
    if snapshot is None:
        return None, 0, rows
    return snapshot[0], snapshot[1], rows


async def _counts(conn: AsyncConnection) -> dict[str, int]:
    cursor = await conn.execute(
        """SELECT (SELECT count(*) FROM doc_index), (SELECT count(*) FROM updates),
            (SELECT count(*) FROM snapshots), (SELECT count(*) FROM devices),
            (SELECT value FROM change_seq)"""
    )
    ((docs, updates, snapshots, devices, seq),) = await cursor.fetchall()
    return {
        "docs": docs,
        "updates": updates,
        "snapshots": snapshots,
        "devices": devices,
        "head": seq,
    }


async def _changes(
    conn: AsyncConnection, scope: ScopeFilter, since: int, limit: int
) -> ChangesPage:
    top = max(await head(conn), since)
    if scope.kind is ScopeKind.NONE:
        return ChangesPage(since, top, [])

    async def changed(after: int, upto: int, limit: int | None) -> list[ChangedDoc]:
        sql = _CHANGED_ALL if scope.kind is ScopeKind.ALL else _CHANGED_IN_SCOPE[scope.kind]
        params = {"value": scope.value, "since": after, "upto": upto, "limit": limit}
        cursor = await conn.execute(sql, params)
        return [ChangedDoc(*row) for row in await cursor.fetchall()]

    docs = await changed(since, top, limit + 1)
    more = len(docs) > limit
    if more:
        # A work order's forms share the seq of its scope change, and `upto` is a bare seq: a
        # page must not end inside such a group, or the next page would skip the rest of it.
        cut = docs[limit].seq
        docs = [doc for doc in docs[:limit] if doc.seq < cut]
        if not docs:
            docs = await changed(cut - 1, cut, None)
            more = bool(await changed(cut, top, 1))
    upto = docs[-1].seq if more else top
    return ChangesPage(since, upto, docs, await _removed(conn, scope, since, upto), more)


async def _follow(conn: AsyncConnection, since: int, limit: int) -> FeedPage:
    page = await _changes(conn, ScopeFilter(ScopeKind.ALL), since, limit)
    params = {"since": since, "upto": page.upto}
    rows = []
    for sql in (_feed.CHANGED, _feed.MOVES, _feed.LATER, _feed.CURRENT, _feed.FORMS):
        cursor = await conn.execute(sql, params)
        rows.append(await cursor.fetchall())
    return _feed.build(page, *rows)


async def _removed(conn: AsyncConnection, scope: ScopeFilter, since: int, upto: int) -> list[str]:
    if scope.kind is ScopeKind.ALL or scope.kind is ScopeKind.NONE:
        return []
    params = {"value": scope.value, "since": since, "upto": upto}
    cursor = await conn.execute(_REMOVED_FROM_SCOPE[scope.kind], params)
    return [doc for (doc,) in await cursor.fetchall()]


async def _history(
    conn: AsyncConnection, doc: str, path: str | None, before: tuple[int, int] | None, limit: int
) -> list[HistoryEntry]:
    where: list[str] = ["doc = %s"]
    params: list[object] = [doc]
    if before is not None:
        where.append("(seq, id) < (%s, %s)")
        params += [before[0], before[1]]
    if path is not None:
        # The path itself and what lies below it ("checklist" covers "checklist.2.done").
        where.append("(path = %s OR (path >= %s AND path < %s))")
        params += [path, path + ".", path + "/"]
    cursor = await conn.execute(
        "SELECT id, seq, at, actor, origin, path, old, new FROM field_history"
        f" WHERE {' AND '.join(where)} ORDER BY seq DESC, id DESC LIMIT %s",
        [*params, limit],
    )
    return [
        HistoryEntry(
            key,
            seq,
            at,
            actor,
            Origin.parse(origin),
            FieldChange(p, orjson.loads(old), orjson.loads(new)),
        )
        for key, seq, at, actor, origin, p, old, new in await cursor.fetchall()
    ]


_CONFLICT_COLUMN = {
    ScopeKind.ASSIGNEE: "assignee",
    ScopeKind.TEAM: "team",
    ScopeKind.REGION: "region",
}


async def _conflicts(
    conn: AsyncConnection, scope: ScopeFilter, before_id: int | None, limit: int
) -> list[ConflictRecord]:
    if scope.kind is ScopeKind.NONE:
        return []
    where = ["id < %s"]
    params: list[object] = [before_id if before_id is not None else 1 << 62]
    if scope.kind is not ScopeKind.ALL:
        where.append(f"{_CONFLICT_COLUMN[scope.kind]} = %s")
        params.append(scope.value)
    cursor = await conn.execute(
        "SELECT id, seq, at, doc, rule, detail, actor, origin, team, region, assignee"
        f" FROM conflicts WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s",
        [*params, limit],
    )
    return [
        ConflictRecord(
            key, seq, at, Conflict(doc, rule, detail, actor, Origin.parse(origin), *cols)
        )
        for key, seq, at, doc, rule, detail, actor, origin, *cols in await cursor.fetchall()
    ]


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()


def _log_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        _log.error("a queued write failed: %r", done.exception())


def _resolve(futures: Iterable[asyncio.Future[Any]], results: list[Any]) -> None:
    for future, result in zip(futures, results, strict=True):
        if future.done():  # the caller may have cancelled it; the write stands anyway
            continue
        if isinstance(result, _Failed):
            future.set_exception(result.error)
        else:
            future.set_result(result)


def _fail(futures: Iterable[asyncio.Future[Any]], cause: Exception) -> None:
    for future in futures:
        if not future.done():
            error = StorageError("the transaction holding this write was rolled back")
            error.__cause__ = cause
            future.set_exception(error)
