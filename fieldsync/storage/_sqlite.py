"""The embedded SQLite backend.

One writer thread owns the only write connection and group-commits whatever is queued: many
writes, one `BEGIN IMMEDIATE … COMMIT`, one fsync. Reads run on a small thread pool, one
read-only connection per thread, each read inside one transaction so it sees one snapshot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pycrdt
from sqlite_utils import Database

from fieldsync.records import (
    UNOBSERVED,
    DocIndex,
    FieldChange,
    Observer,
    Origin,
    ScopeFilter,
    ScopeKind,
)
from fieldsync.storage import _conflicts, _feed, _outbox, _screens
from fieldsync.storage._migrations import migrate
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

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_READERS = 3
# Group commit under load: how long a commit waits for more writes at most, in steps of how
# long, and how soon after the last commit a write must come for the writer to count as busy.
_COMMIT_DELAY = 0.002
_COMMIT_STEP = 0.0005
_BUSY_AFTER = 0.005
# The same for a commit that begins with a write nothing waits for (`Write.awaited`): fuller
# commits took a fifth off a y-websocket fleet's server CPU per update (S1 profile, 382-390 ->
# 312-319 µs; bench/README.md). A write that is awaited ends the wait after the step it came in.
_RELAXED_DELAY = 0.010
_RELAXED_STEP = 0.002
_BUSY_TIMEOUT_MS = 5000

# The index columns follow `DocIndex`, so a field added there fails loudly here until a migration
# adds its column.
_INDEX_COLUMNS = tuple(f.name for f in fields(DocIndex))
_SELECT_INDEX = f"SELECT {', '.join(_INDEX_COLUMNS)} FROM doc_index WHERE doc = ?"
# The times the screens' metrics need are kept beside the projection (`_screens`).
_UPSERT_INDEX = f"""
    INSERT INTO doc_index ({", ".join(_INDEX_COLUMNS)},
                           seq, last_seq, created_seq, log_count, log_bytes,
                           {", ".join(_screens.INSERT_TIMES)})
    VALUES ({", ".join(f":{c}" for c in _INDEX_COLUMNS)}, :seq, :seq, :created_seq, :count,
            :bytes, {", ".join(_screens.INSERT_TIMES.values())})
    ON CONFLICT (doc) DO UPDATE SET
        {", ".join(f"{c} = excluded.{c}" for c in _INDEX_COLUMNS[1:])},
        seq = excluded.seq,
        last_seq = excluded.last_seq,
        log_count = log_count + excluded.log_count,
        log_bytes = log_bytes + excluded.log_bytes,
        {", ".join(f"{c} = {sql}" for c, sql in _screens.UPDATE_TIMES.items())}
    RETURNING log_count, log_bytes
"""

# The same for a row whose status stays (`_IndexRows`): only the columns that changed are set.
_UPDATE_INDEX = """
    UPDATE doc_index SET {columns}seq = :seq, last_seq = :seq,
        log_count = log_count + :count, log_bytes = log_bytes + :bytes
    WHERE doc = :doc
    RETURNING log_count, log_bytes
"""

_SCOPE_COLUMNS = {
    ScopeKind.ASSIGNEE: "assignee",
    ScopeKind.TEAM: "team",
    ScopeKind.REGION: "region",
}

# A document is in a scope through the row its `wo` names: its own for a work order, its work
# order's for a form. A form whose work order does not exist joins nothing.
_CHANGED_ALL = """
    SELECT doc, type, seq FROM doc_index
    WHERE seq > :since AND seq <= :upto
    ORDER BY seq, doc LIMIT :limit
"""
_CHANGED_IN_SCOPE = {
    kind: f"""
    SELECT d.doc, d.type, d.seq FROM doc_index w JOIN doc_index d ON d.wo = w.doc
    WHERE w.{column} = :value AND d.seq > :since AND d.seq <= :upto
    ORDER BY d.seq, d.doc LIMIT :limit
    """
    for kind, column in _SCOPE_COLUMNS.items()
}
_REMOVED_FROM_SCOPE = {
    kind: f"""
    WITH gone AS (
        SELECT DISTINCT h.doc FROM scope_history h
        WHERE h.seq > :since AND h.seq <= :upto AND h.{column} = :value
          AND NOT EXISTS (
              SELECT 1 FROM doc_index d JOIN doc_index w ON w.doc = d.wo
              WHERE d.doc = h.doc AND w.{column} = :value))
    SELECT doc FROM gone
    UNION
    -- CROSS JOIN keeps this order: from the few gone work orders to their forms by index,
    -- where the planner would otherwise scan every document.
    SELECT f.doc FROM gone CROSS JOIN doc_index f ON f.wo = gone.doc
    ORDER BY doc
    """
    for kind, column in _SCOPE_COLUMNS.items()
}


class StorageError(Exception):
    """The store could not do what was asked; `__cause__` holds the database's own error."""


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
    work: Callable[[Transaction], Any]
    future: asyncio.Future[Any]


class _Stop:
    """Queued by `close()`: the writer finishes every job queued before it, then exits."""


_Job = _Append | _Touch | _Call | _Stop


class Transaction:
    """What a `SQLiteStore.transact` job gets: the writer's connection inside the current group
    commit, and the global change sequence to number what it records."""

    def __init__(self, db: Database, seq: int) -> None:
        self.db = db
        self.seq = seq

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class SQLiteStore:
    """A `Store` in one SQLite file (WAL, `synchronous=FULL`: an acknowledged write survives
    power loss).

    A document whose update log reaches `compact_after_updates` rows or `compact_after_bytes`
    bytes is compacted into its snapshot after the batch that crossed the line is acknowledged.
    At most `batch_max` queued writes share one transaction."""

    def __init__(
        self,
        path: Path,
        *,
        compact_after_updates: int = 500,
        compact_after_bytes: int = 1 << 20,
        batch_max: int = 1000,
        observer: Observer = UNOBSERVED,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self._path = path
        self._compact_after_updates = compact_after_updates
        self._compact_after_bytes = compact_after_bytes
        self._batch_max = batch_max
        self._last_commit = 0.0  # perf_counter when the writer last committed
        # Awaited jobs queued (counted by the loop) and taken (by the writer): each counter has
        # one writing thread, so the writer can tell whether any awaited job waits in the queue.
        self._awaited_put = 0
        self._awaited_taken = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_dbs: list[Database] = []
        self._reader_dbs_lock = threading.Lock()
        self._commits = 0
        self._observer = observer
        # The outbox's subscriptions (`set_outbox_routes`), read by the writer thread per batch.
        self._outbox_routes: _outbox.Routes = {}
        self._outbox_notify: Callable[[], None] | None = None

    # Lifecycle

    async def open(self) -> None:
        if self._writer is not None:
            raise StorageError(f"{self._path} is already open")
        self._loop = asyncio.get_running_loop()
        self._queue = queue.SimpleQueue()
        self._reader_local = threading.local()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        # A daemon thread: a process that exits without close() loses only unacknowledged writes.
        writer = threading.Thread(
            target=self._run_writer, args=(started,), name="fieldsync-sqlite-writer", daemon=True
        )
        writer.start()
        try:
            await asyncio.wrap_future(started)
        except Exception as exc:
            await asyncio.to_thread(writer.join)
            raise StorageError(f"cannot open {self._path}") from exc
        self._writer = writer
        self._readers = concurrent.futures.ThreadPoolExecutor(
            _READERS, thread_name_prefix="fieldsync-sqlite-read"
        )

    async def close(self) -> None:
        """Commit everything already queued, then stop the threads and close the connections."""
        writer, readers = self._writer, self._readers
        if writer is None or readers is None:
            return
        self._writer = self._readers = None
        self._queue.put(_Stop())
        await asyncio.to_thread(writer.join)
        await asyncio.to_thread(readers.shutdown)
        with self._reader_dbs_lock:
            dbs, self._reader_dbs = self._reader_dbs, []
        for db in dbs:
            db.close()

    # Writes

    def append(self, write: Write) -> asyncio.Future[Committed]:
        """See `Store.append`. Call it on the event loop `open()` ran on: the future belongs to
        that loop. An index for another document is a caller's bug, raised as ValueError here
        rather than failing a whole batch later."""
        if self._writer is None or self._loop is None:
            raise StorageError("the store is not open")
        if write.index is not None and write.index.doc != write.doc:
            raise ValueError(f"index of {write.index.doc!r} given for {write.doc!r}")
        future: asyncio.Future[Committed] = self._loop.create_future()
        if write.awaited:
            self._awaited_put += 1
        self._queue.put(_Append(write, future, time.time()))
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
        self._queue.put(_Touch(seen, time.time()))

    def transact(self, work: Callable[[Transaction], _T]) -> asyncio.Future[_T]:
        """Run `work` on the writer thread inside the next group commit; the future resolves
        with its result once committed. A job that raises is rolled back alone (a savepoint),
        its future fails, and the rest of the batch commits. For the concerns that keep their
        own tables (reference data, attachments…): one writer, one fsync per batch."""
        if self._writer is None or self._loop is None:
            raise StorageError("the store is not open")
        future: asyncio.Future[_T] = self._loop.create_future()
        self._awaited_put += 1
        self._queue.put(_Call(work, future))
        return future

    async def query(self, read: Callable[[Database], _T]) -> _T:
        """Run `read` on a reader thread, in one read transaction (one committed snapshot)."""
        return await self._read(read)

    # Reads

    async def load(self, doc: str) -> StoredDoc | None:
        return await self._read(lambda db: _load(db, doc))

    async def load_many(self, docs: Sequence[str]) -> dict[str, StoredDoc | None]:
        return await self._read(lambda db: {doc: _load(db, doc) for doc in docs})

    async def index(self, doc: str) -> DocIndex | None:
        return await self._read(lambda db: _index(db, doc))

    async def scope_index(self, doc: str) -> DocIndex | None:
        return await self._read(lambda db: _scope_index(db, doc))

    async def changes(self, scope: ScopeFilter, since: int, limit: int) -> ChangesPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._read(lambda db: _changes(db, scope, since, limit))

    async def head(self) -> int:
        return await self._read(_head)

    async def follow(self, since: int, limit: int) -> FeedPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._read(lambda db: _follow(db, since, limit))

    async def history(
        self, doc: str, path: str | None, before: tuple[int, int] | None, limit: int
    ) -> list[HistoryEntry]:
        return await self._read(lambda db: _history(db, doc, path, before, limit))

    async def last_seen(self, device_id: str, subject: str) -> float | None:
        query = "SELECT last_seen FROM devices WHERE device_id = ? AND subject = ?"
        rows = await self._read(lambda db: db.execute(query, (device_id, subject)).fetchall())
        return float(rows[0][0]) if rows else None

    async def devices(self, subject: str | None = None, limit: int = 1000) -> list[DeviceRecord]:
        query = (
            "SELECT device_id, subject, platform, version, last_seen, last_seq FROM devices"
            " WHERE :subject IS NULL OR subject = :subject ORDER BY last_seen DESC LIMIT :limit"
        )
        params = {"subject": subject, "limit": limit}
        return await self._read(
            lambda db: [DeviceRecord(*row) for row in db.execute(query, params).fetchall()]
        )

    def compact(self, doc: str) -> asyncio.Future[int]:
        """Merge `doc`'s update log into its snapshot in the next group commit (what happens
        past `compact_after_updates` anyway); resolves with the log rows merged."""
        return self.transact(lambda txn: _merge_log(txn.db, doc))

    async def devices_in(self, scope: ScopeFilter, limit: int) -> list[DeviceRecord]:
        return await self._read(lambda db: _devices_in(db, scope, limit))

    async def forms(self, wo: str) -> list[str]:
        query = "SELECT doc FROM doc_index WHERE wo = ? AND type = 'form' ORDER BY doc"
        return await self._read(lambda db: [row[0] for row in db.execute(query, (wo,))])

    def record_conflict(self, conflict: Conflict, fence: int | None = None) -> None:
        def work(txn: Transaction) -> None:
            _conflicts.record(txn.db, txn.seq, conflict)

        recorded = self.transact(work)
        recorded.add_done_callback(_log_failure)

    async def conflicts(
        self, scope: ScopeFilter, before_id: int | None, limit: int
    ) -> list[ConflictRecord]:
        return await self._read(lambda db: _conflicts.page(db, scope, before_id, limit))

    async def stats(self) -> dict[str, int]:
        counts = await self._read(_counts)
        return {**counts, "commits": self._commits}

    async def _read(self, query: Callable[[Database], _T]) -> _T:
        if self._readers is None:
            raise StorageError("the store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._in_snapshot, query)

    def _in_snapshot(self, query: Callable[[Database], _T]) -> _T:
        db = self._reader_db()
        # One transaction, so every SELECT of `query` sees the same committed state.
        with db.atomic():
            return query(db)

    def _reader_db(self) -> Database:
        db: Database | None = getattr(self._reader_local, "db", None)
        if db is None:
            uri = f"{self._path.resolve().as_uri()}?mode=ro"
            # check_same_thread=False only so close() can close it once the pool has stopped.
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            db = Database(conn)
            self._reader_local.db = db
            with self._reader_dbs_lock:
                self._reader_dbs.append(db)
        return db

    # The writer thread

    def _run_writer(self, started: concurrent.futures.Future[None]) -> None:
        try:
            db = self._open_writer()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            while True:
                batch, stop = self._take_batch()
                if batch:
                    self._commit_batch(db, batch)
                if stop:
                    return
        finally:
            db.close()

    def _open_writer(self) -> Database:
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            db = Database(conn)
            db.enable_wal()
            # FULL: in WAL mode NORMAL may lose the last commits on power loss, and an
            # acknowledged write must not be lost.
            conn.execute("PRAGMA synchronous = FULL")
            migrate(db)
        except BaseException:
            conn.close()
            raise
        return db

    def _take_batch(self) -> tuple[list[_Append | _Touch | _Call], bool]:
        """Block for one job, then take whatever else is already queued, up to `batch_max`.
        Under a steady stream of writes (the last commit ended moments before this job came)
        it first lets more come, up to `_COMMIT_DELAY`, or `_RELAXED_DELAY` while nothing
        queued is awaited: most of a commit's CPU is its own (the fsync, the statements around
        it), and fan-out does not wait for it, only the acks do. Sleeps rather than waits on
        the queue: a wait would wake this thread, and take the GIL, per write."""
        job = self._queue.get()
        relaxed = not self._took(job) and self._awaited_put == self._awaited_taken
        if time.perf_counter() - self._last_commit < _BUSY_AFTER:
            delay, step = (
                (_RELAXED_DELAY, _RELAXED_STEP) if relaxed else (_COMMIT_DELAY, _COMMIT_STEP)
            )
            # In steps, for as long as writes keep coming: devices that each wait for their
            # ack (a closed loop) have all sent theirs after one step, and stop waiting there.
            waited, queued = 0.0, self._queue.qsize()
            while waited < delay:
                time.sleep(step)
                waited += step
                grown, queued = self._queue.qsize() > queued, self._queue.qsize()
                if not grown or (relaxed and self._awaited_put != self._awaited_taken):
                    break
        batch: list[_Append | _Touch | _Call] = []
        while not isinstance(job, _Stop):
            batch.append(job)
            if len(batch) >= self._batch_max:
                return batch, False
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
            self._took(job)
        return batch, True

    def _took(self, job: _Append | _Touch | _Call | _Stop) -> bool:
        """Count `job` taken from the queue; returns whether something waits for it."""
        awaited = job.write.awaited if isinstance(job, _Append) else isinstance(job, _Call)
        self._awaited_taken += awaited
        return awaited or isinstance(job, _Stop)

    def _commit_batch(self, db: Database, batch: list[_Append | _Touch | _Call]) -> None:
        settled = [job for job in batch if not isinstance(job, _Touch)]
        results: list[Any] = []
        routes, outboxed = self._outbox_routes, False
        began = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            # Read under the write lock rather than cached: another process may have written.
            ((seq,),) = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchall()
            txn = Transaction(db, seq)
            # Each document's index as this batch left it: a burst of updates to one document
            # reads its row once per batch, and writes it once per run of updates that leave
            # its projection as it was (`_IndexRows`).
            indexes: dict[str, DocIndex | None] = {}
            rows = _IndexRows(db)
            for job in batch:
                if isinstance(job, _Touch):
                    _write_device(db, job)
                elif isinstance(job, _Call):
                    rows.flush()
                    indexes.clear()  # a job of another concern may write any row
                    results.append(_run_isolated(txn, job))
                else:
                    committed = _write_update(db, job, txn.next_seq(), indexes, rows)
                    results.append(committed)
                    # Outbox: in the update's transaction, so an ack implies its entries.
                    if routes and _outbox.write_entries(
                        db, routes, job.write.doc, committed.seq, str(job.write.origin), job.at
                    ):
                        outboxed = True
            rows.flush()
            to_compact = {
                doc
                for doc, (log_count, log_bytes) in rows.logs.items()
                if log_count >= self._compact_after_updates
                or log_bytes >= self._compact_after_bytes
            }
            db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (txn.seq,))
            db.execute("COMMIT")
        except Exception as exc:
            db.rollback()
            _log.warning("rolled back a batch of %d writes", len(settled), exc_info=exc)
            self._to_loop(_fail, [job.future for job in settled], exc)
            return
        self._commits += 1
        self._last_commit = time.perf_counter()
        self._observer.committed(len(batch), self._last_commit - began)
        self._to_loop(_resolve, [job.future for job in settled], results)
        if outboxed and self._outbox_notify is not None:
            self._to_loop(self._outbox_notify)
        for doc in sorted(to_compact):
            self._compact(db, doc)

    def _to_loop(self, callback: Callable[..., None], *args: object) -> None:
        """One hop to the event loop per batch, however many futures it settles."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            _log.warning("event loop closed; %s not delivered", callback.__name__)

    def _compact(self, db: Database, doc: str) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
            _merge_log(db, doc)
            db.execute("COMMIT")
        except Exception:
            db.rollback()
            # Nothing is lost: the log stays, and the next write to the document tries again.
            _log.exception("compacting %s failed", doc)
            return
        self._commits += 1


# Run in the writer thread, inside its transaction.


def _merge_log(db: Database, doc: str) -> int:
    """Merge `doc`'s update log into its snapshot; return how many log rows it merged."""
    snapshot = db.execute("SELECT data FROM snapshots WHERE doc = ?", (doc,)).fetchone()
    rows = db.execute("SELECT seq, data FROM updates WHERE doc = ? ORDER BY seq", (doc,)).fetchall()
    if rows:
        upto = rows[-1][0]
        parts = ([snapshot[0]] if snapshot else []) + [data for _, data in rows]
        db.execute(
            """INSERT INTO snapshots (doc, data, upto_seq) VALUES (?, ?, ?)
            ON CONFLICT (doc) DO UPDATE SET
                data = excluded.data, upto_seq = excluded.upto_seq""",
            (doc, _merge(parts), upto),
        )
        db.execute("DELETE FROM updates WHERE doc = ? AND seq <= ?", (doc, upto))
    db.execute("UPDATE doc_index SET log_count = 0, log_bytes = 0 WHERE doc = ?", (doc,))
    return len(rows)


def _write_update(
    db: Database,
    job: _Append,
    seq: int,
    indexes: dict[str, DocIndex | None],
    rows: _IndexRows,
) -> Committed:
    """Log the update and project it into `doc_index` (through `rows`).
    `indexes`: the rows this batch wrote so far, by document (read from the table otherwise)."""
    write = job.write
    before = indexes[write.doc] if write.doc in indexes else _index(db, write.doc)
    after = write.index or before or _new_index(write.doc)
    indexes[write.doc] = after
    db.execute(
        "INSERT INTO updates (seq, doc, data, origin, actor, at) VALUES (?, ?, ?, ?, ?, ?)",
        (seq, write.doc, write.data, str(write.origin), write.actor, job.at),
    )
    if write.history:
        origin = str(write.origin)
        # In the update's own transaction: the history never lacks a stored change, and never
        # holds one that was not stored.
        db.conn.executemany(
            "INSERT INTO field_history (seq, doc, path, old, new, actor, origin, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
    rows.add(before, after, seq, len(write.data), job.at)
    moved = after.type == "wo" and (before is None or _scope(before) != _scope(after))
    if moved:
        rows.flush()  # `_move_scope` writes the forms' rows after their own writes
    return Committed(seq, _move_scope(db, seq, before, after) if moved else None)


class _IndexRows:
    """The `doc_index` rows a group commit writes: one write per run of updates to a document
    that leave its projection unchanged (a burst of notes and field edits), and only the
    columns that changed, so that SQLite rewrites the entries of the row's indexes that hold
    them and not all nine. A run ends when the projection changes, and a status change goes
    through the upsert, so the screens' times (completed, reopened) see every transition."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._runs: dict[str, _Run] = {}
        # doc -> (log_count, log_bytes) after this batch's writes, for compaction
        self.logs: dict[str, tuple[int, int]] = {}

    def add(self, before: DocIndex | None, after: DocIndex, seq: int, size: int, at: float) -> None:
        run = self._runs.get(after.doc)
        if run is not None and run.index != after:
            self._write(run)
            run = None
        if run is None:
            self._runs[after.doc] = _Run(before, after, seq, at, seq, 1, size)
        else:
            run.seq, run.count, run.size = seq, run.count + 1, run.size + size

    def flush(self) -> None:
        for run in list(self._runs.values()):
            self._write(run)

    def _write(self, run: _Run) -> None:
        del self._runs[run.index.doc]
        before, index = run.before, run.index
        if before is None or before.status != index.status:
            query, params = (
                _UPSERT_INDEX,
                {
                    **{c: getattr(index, c) for c in _INDEX_COLUMNS},
                    "created_seq": run.first,
                    # A run's projection came in with its first update: so did a completion.
                    "at": run.at,
                },
            )
        else:
            changed = [c for c in _INDEX_COLUMNS[1:] if getattr(before, c) != getattr(index, c)]
            query = _UPDATE_INDEX.format(columns="".join(f"{c} = :{c}, " for c in changed))
            params = {c: getattr(index, c) for c in changed}
            params["doc"] = index.doc
        params.update(seq=run.seq, count=run.count, bytes=run.size)
        ((log_count, log_bytes),) = self._db.execute(query, params).fetchall()
        self.logs[index.doc] = (log_count, log_bytes)


@dataclass(slots=True)
class _Run:
    """Updates to one document in a group commit that leave its projection `index`."""

    before: DocIndex | None  # the row as stored before the run
    index: DocIndex
    first: int  # seq
    at: float  # of the first update
    seq: int  # the last
    count: int
    size: int  # bytes


def _history(
    db: Database, doc: str, path: str | None, before: tuple[int, int] | None, limit: int
) -> list[HistoryEntry]:
    where: list[str] = ["doc = ?"]
    params: list[object] = [doc]
    if before is not None:
        where.append("(seq < ? OR (seq = ? AND rowid < ?))")
        params += [before[0], before[0], before[1]]
    if path is not None:
        # The path itself and what lies below it ("checklist" covers "checklist.2.done").
        where.append("(path = ? OR (path >= ? AND path < ?))")
        params += [path, path + ".", path + "/"]
    rows = db.execute(
        "SELECT rowid, seq, at, actor, origin, path, old, new FROM field_history"
        f" WHERE {' AND '.join(where)} ORDER BY seq DESC, rowid DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [
        HistoryEntry(
            rowid,
            seq,
            at,
            actor,
            Origin.parse(origin),
            FieldChange(p, orjson.loads(old), orjson.loads(new)),
        )
        for rowid, seq, at, actor, origin, p, old, new in rows
    ]


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()


def _new_index(doc: str) -> DocIndex:
    """The index of a document first written without one: its type is its id's prefix."""
    kind = doc.partition(":")[0]
    return DocIndex(doc, kind, doc if kind == "wo" else None)


def _move_scope(
    db: Database, seq: int, before: DocIndex | None, after: DocIndex
) -> ScopeChange | None:
    if after.type != "wo":
        return None
    if before is not None:
        if _scope(before) == _scope(after):
            return None
        db.execute(
            "INSERT INTO scope_history (seq, doc, assignee, team, region) VALUES (?, ?, ?, ?, ?)",
            (seq, before.doc, *_scope(before)),
        )
    # The forms move with their work order: their feed position jumps to this seq, so a reader
    # whose scope now includes the work order receives forms that did not change themselves.
    forms = db.execute(
        "UPDATE doc_index SET seq = ? WHERE wo = ? AND doc <> wo RETURNING doc", (seq, after.doc)
    ).fetchall()
    return ScopeChange(after.doc, before, after, tuple(sorted(form for (form,) in forms)))


def _scope(index: DocIndex) -> tuple[str | None, str | None, str | None]:
    return index.assignee, index.team, index.region


def _write_device(db: Database, job: _Touch) -> None:
    seen = job.seen
    db.execute(
        """INSERT INTO devices
            (device_id, subject, platform, version, last_seen, last_seq, team, region)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)
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


def _devices_in(db: Database, scope: ScopeFilter, limit: int) -> list[DeviceRecord]:
    if scope.kind is ScopeKind.NONE:
        return []
    params: list[object] = [limit]
    where = "1"
    if scope.kind is not ScopeKind.ALL:
        where, params = f"{_DEVICE_SCOPE[scope.kind]} = ?", [scope.value, limit]
    rows = db.execute(
        "SELECT device_id, subject, platform, version, last_seen, last_seq, team, region"
        f" FROM devices WHERE {where} ORDER BY last_seen DESC, device_id LIMIT ?",
        params,
    ).fetchall()
    return [DeviceRecord(*row) for row in rows]


def _merge(parts: list[bytes]) -> bytes:
    """The snapshot holding `parts`: the state of a document built from them, plus any structs
    still waiting for an update that has not arrived.

    Yrs leaves such structs out of `get_update()`; dropping them would lose those edits for good
    when the missing update arrives later, so they are kept beside the state."""
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    for part in parts:
        ydoc.apply_update(part)
    state = ydoc.get_update()
    pending = pycrdt.get_update(pycrdt.merge_updates(*parts), ydoc.get_state())
    # A v1 update starts with its count of clients with structs: 0 means only a delete set.
    return pycrdt.merge_updates(state, pending) if pending[0] else state


# Run in a reader thread, inside one read transaction.


def _index(db: Database, doc: str) -> DocIndex | None:
    row = db.execute(_SELECT_INDEX, (doc,)).fetchone()
    return DocIndex(*row) if row else None


def _scope_index(db: Database, doc: str) -> DocIndex | None:
    index = _index(db, doc)
    if index is None or index.wo is None:
        return None
    return index if index.wo == doc else _index(db, index.wo)


def _load(db: Database, doc: str) -> StoredDoc | None:
    index = _index(db, doc)
    if index is None:
        return None
    ((last_seq,),) = db.execute("SELECT last_seq FROM doc_index WHERE doc = ?", (doc,)).fetchall()
    snapshot = db.execute("SELECT data, upto_seq FROM snapshots WHERE doc = ?", (doc,)).fetchone()
    data, upto = snapshot if snapshot else (None, 0)
    updates = db.execute(
        "SELECT data FROM updates WHERE doc = ? AND seq > ? ORDER BY seq", (doc, upto)
    )
    return StoredDoc(data, [update for (update,) in updates], last_seq, index)


def _head(db: Database) -> int:
    ((seq,),) = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchall()
    return int(seq)


def _counts(db: Database) -> dict[str, int]:
    return {
        "docs": db["doc_index"].count,
        "updates": db["updates"].count,
        "snapshots": db["snapshots"].count,
        "devices": db["devices"].count,
        "head": _head(db),
    }


def _changes(db: Database, scope: ScopeFilter, since: int, limit: int) -> ChangesPage:
    head = max(_head(db), since)
    if scope.kind is ScopeKind.NONE:
        return ChangesPage(since, head, [])

    def changed(after: int, upto: int, limit: int) -> list[ChangedDoc]:
        sql = _CHANGED_ALL if scope.kind is ScopeKind.ALL else _CHANGED_IN_SCOPE[scope.kind]
        params = {"value": scope.value, "since": after, "upto": upto, "limit": limit}
        return [ChangedDoc(*row) for row in db.execute(sql, params)]

    docs = changed(since, head, limit + 1)
    more = len(docs) > limit
    if more:
        # A work order's forms share the seq of its scope change, and `upto` is a bare seq: a
        # page must not end inside such a group, or the next page would skip the rest of it.
        cut = docs[limit].seq
        docs = [doc for doc in docs[:limit] if doc.seq < cut]
        if not docs:
            docs = changed(cut - 1, cut, -1)
            more = bool(changed(cut, head, 1))
    upto = docs[-1].seq if more else head
    return ChangesPage(since, upto, docs, _removed(db, scope, since, upto), more)


_FEED = tuple(
    _feed.sqlite(sql)
    for sql in (_feed.CHANGED, _feed.MOVES, _feed.LATER, _feed.CURRENT, _feed.FORMS)
)


def _follow(db: Database, since: int, limit: int) -> FeedPage:
    page = _changes(db, ScopeFilter(ScopeKind.ALL), since, limit)
    params = {"since": since, "upto": page.upto}
    changed, moves, later, current, forms = (db.execute(sql, params).fetchall() for sql in _FEED)
    return _feed.build(page, changed, moves, later, current, forms)


def _removed(db: Database, scope: ScopeFilter, since: int, upto: int) -> list[str]:
    if scope.kind is ScopeKind.ALL or scope.kind is ScopeKind.NONE:
        return []
    params = {"value": scope.value, "since": since, "upto": upto}
    return [doc for (doc,) in db.execute(_REMOVED_FROM_SCOPE[scope.kind], params)]


class _Failed:
    """A `transact` job's own failure, carried to its future after the batch commits."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _run_isolated(txn: Transaction, job: _Call) -> Any:
    seq = txn.seq
    txn.db.execute("SAVEPOINT job")
    try:
        result = job.work(txn)
    except Exception as exc:
        txn.db.execute("ROLLBACK TO job")
        txn.db.execute("RELEASE job")
        txn.seq = seq  # numbers drawn by the rolled-back job are given again
        return _Failed(exc)
    txn.db.execute("RELEASE job")
    return result


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
