"""Reference data on SQLite (DESIGN.md §2, §5): the asset registry, the parts catalogue, and any
other server-authoritative dataset adapters import and devices only read.

Each dataset is rows (`ref_rows`, one JSON object per key) plus a field-level change log
(`ref_changes`) numbered from the global change sequence, so a device that last synced at N
downloads only the fields that changed after N, and the keys deleted. Its history older than the
retention is compacted away; `ref_datasets.horizon` remembers how far, so a device asking from
before it is told to start over from a snapshot instead of silently missing changes.

Everything runs through the store's two seams: imports are `transact` jobs on the one writer
thread, in the same group commits as the devices' updates, and reads are `query` calls in one
snapshot on a reader thread. An import of 10⁵ to 10⁶ rows is cut into chunks of a few thousand rows,
one job each, and the next chunk is queued only once the previous one committed: a device's
update waits behind at most one chunk, never behind the whole import.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import orjson
from sqlite_utils import Database

from fieldsync.storage._sqlite import SQLiteStore, StorageError, Transaction
from fieldsync.storage._types import (
    DatasetInfo,
    ImportResult,
    InvalidRow,
    ReferencePage,
    ResyncRequired,
    RowChange,
    SnapshotHead,
)

__all__ = ["SQLiteReference"]

_T = TypeVar("_T")

# Rows per import job. A chunk of 2,000 rows of about ten fields takes the writer some 10-30 ms
# to diff and write on these machines, which bounds how long a device's ack can wait on it.
CHUNK_ROWS = 2000
# A full import looks for the rows it did not contain by walking the stored keys in order, this
# many per job (a plain read and a lookup per key: cheaper than a chunk of the import).
_SCAN_FACTOR = 4
# Change log entries dropped per compaction job, for the same reason.
_COMPACT_ENTRIES = 5000
# Names of the temporary tables of full imports, unique on the writer's one connection however
# many `SQLiteReference` share it.
_IMPORT_IDS = itertools.count(1)
# Keys are names (asset tags, part numbers), not documents.
_MAX_KEY_CHARS = 256

# Canonical JSON: keys sorted, so one row always serialises to the same text and an unchanged
# row is found by comparing two strings, without parsing either.
_CANONICAL = orjson.OPT_SORT_KEYS

_UPSERT_ROW = """
    INSERT INTO ref_rows (dataset, key, data, seq) VALUES (?, ?, ?, ?)
    ON CONFLICT (dataset, key) DO UPDATE SET data = excluded.data, seq = excluded.seq
"""
_INSERT_CHANGE = """
    INSERT INTO ref_changes (seq, dataset, key, field, value, deleted) VALUES (?, ?, ?, ?, ?, ?)
"""
_CHANGES_AFTER = """
    SELECT seq, key, field, value, deleted FROM ref_changes
    WHERE dataset = ? AND seq > ? ORDER BY seq
"""


@dataclass(frozen=True, slots=True)
class _Row:
    key: str
    data: str  # canonical JSON text of the whole row
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Chunk:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    duplicates: int = 0
    seq: int = 0


class SQLiteReference:
    """The `ReferenceStore` of a `SQLiteStore`, through its `transact` and `query`. Imports into one
    dataset are serialised (a full import's deletions must not race another import's rows);
    different datasets import in parallel, chunk by chunk."""

    def __init__(self, store: SQLiteStore, *, chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        self._store = store
        self._chunk_rows = chunk_rows
        self._locks: dict[str, asyncio.Lock] = {}

    # Imports

    async def import_rows(
        self,
        dataset: str,
        rows: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        key: str = "id",
        full: bool,
        progress: Callable[[ImportResult], None] | None = None,
    ) -> ImportResult:
        lock = self._locks.setdefault(dataset, asyncio.Lock())
        async with lock:
            # The keys a full import has seen, for finding the rows it lacks: a temporary table
            # on the writer's connection rather than a Python set, so 10⁶ keys cost no memory
            # here, and a crash takes it with the connection.
            seen = f"ref_seen_{next(_IMPORT_IDS)}" if full else None
            if seen is not None:
                await self._store.transact(lambda txn: _create_seen(txn, seen))
            try:
                return await self._import(dataset, rows, key, seen, progress)
            finally:
                # A store already closed has closed the connection, and its temporary tables
                # with it; the import's own outcome is what the caller needs to hear about.
                if seen is not None:
                    with contextlib.suppress(StorageError):
                        await self._store.transact(lambda txn: _drop_seen(txn, seen))

    async def _import(
        self,
        dataset: str,
        rows: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        key: str,
        seen: str | None,
        progress: Callable[[ImportResult], None] | None,
    ) -> ImportResult:
        result = ImportResult(dataset, full=seen is not None)
        position = 0
        # One chunk in the writer while the next is read and checked here: the two overlap, and
        # still no more than one chunk of the import is ever queued ahead of a device's update.
        in_flight: tuple[Awaitable[_Chunk], int] | None = None

        async def settle() -> None:
            nonlocal result, in_flight
            if in_flight is not None:
                job, count = in_flight
                in_flight = None
                result = _add(result, await job, rows=count)
                if progress is not None:
                    progress(result)

        try:
            async for chunk in _chunks(rows, self._chunk_rows):
                prepared = []
                for row in chunk:
                    position += 1
                    prepared.append(_prepare(row, key, position))
                await settle()
                job = self._store.transact(partial(_apply_chunk, dataset, prepared, seen))
                in_flight = (job, len(prepared))
        finally:
            # Also when reading the rows failed: the chunk already queued commits anyway, and
            # the caller's last progress report must include it.
            await settle()
        if seen is not None:
            # Only now that every row has been read: a full import cut short (a dropped upload,
            # a bad row) must not delete the rows it did not get to.
            after: str | None = ""
            while after is not None:
                scan = partial(
                    _delete_absent, dataset, seen, after, self._chunk_rows * _SCAN_FACTOR
                )
                done, after = await self._store.transact(scan)
                if done.deleted:
                    result = _add(result, done, rows=0)
                    if progress is not None:
                        progress(result)
        result = replace(result, done=True)
        if progress is not None:
            progress(result)
        return result

    # Reads

    async def changes(self, dataset: str, since: int, limit: int) -> ReferencePage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._store.query(lambda db: _changes(db, dataset, since, limit))

    async def snapshot(
        self, dataset: str, consume: Callable[[SnapshotHead, Iterator[tuple[str, str]]], _T]
    ) -> _T:
        def read(db: Database) -> _T:
            info = _info(db, dataset)
            head = SnapshotHead(dataset, _head(db), info.rows if info else 0)
            rows = db.execute(
                "SELECT key, data FROM ref_rows WHERE dataset = ? ORDER BY key", (dataset,)
            )
            return consume(head, ((key, data) for key, data in rows))

        return await self._store.query(read)

    async def rows(self, dataset: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(dict.fromkeys(keys))

        def read(db: Database) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for start in range(0, len(wanted), 500):  # within SQLite's bound on parameters
                part = wanted[start : start + 500]
                marks = ",".join("?" * len(part))
                query = f"SELECT key, data FROM ref_rows WHERE dataset = ? AND key IN ({marks})"
                for key, data in db.execute(query, (dataset, *part)):
                    found[key] = orjson.loads(data)
            return found

        return await self._store.query(read) if wanted else {}

    async def info(self, dataset: str) -> DatasetInfo | None:
        return await self._store.query(lambda db: _info(db, dataset))

    async def datasets(self) -> list[DatasetInfo]:
        def read(db: Database) -> list[DatasetInfo]:
            query = "SELECT dataset, seq, horizon, rows FROM ref_datasets ORDER BY dataset"
            return [DatasetInfo(*row) for row in db.execute(query)]

        return await self._store.query(read)

    # Maintenance

    async def compact(self, before: float) -> dict[str, int]:
        """Move each dataset's horizon up to the last change committed before `before` (epoch
        seconds), then drop the log entries at or below it, a bounded number per job."""
        plans = await self._store.query(lambda db: _compaction_plan(db, before))
        horizons: dict[str, int] = {}
        for dataset, horizon, cutoff in plans:
            if cutoff > horizon:
                # The horizon moves first, in its own commit: from then on no reader is answered
                # from the entries about to go, however long deleting them takes.
                await self._store.transact(partial(_raise_horizon, dataset, cutoff))
            horizons[dataset] = upto = max(horizon, cutoff)
            # Also finishes a compaction an earlier run raised the horizon for but did not
            # complete.
            while await self._store.transact(partial(_drop, dataset, upto)):
                pass
        return horizons


# The writer thread, inside the group commit (each job isolated by a savepoint).


def _create_seen(txn: Transaction, table: str) -> None:
    txn.db.execute(f"CREATE TEMP TABLE {table} (key TEXT PRIMARY KEY) WITHOUT ROWID")


def _drop_seen(txn: Transaction, table: str) -> None:
    txn.db.execute(f"DROP TABLE IF EXISTS temp.{table}")


def _apply_chunk(dataset: str, rows: list[_Row], seen: str | None, txn: Transaction) -> _Chunk:
    db = txn.db
    # The last of a key given twice counts, as it would had the rows been imported one by one.
    latest = {row.key: row for row in rows}
    duplicates = len(rows) - len(latest)
    keys = orjson.dumps(list(latest)).decode()
    if seen is not None:
        before = db.conn.total_changes
        db.execute(
            f"INSERT OR IGNORE INTO temp.{seen} (key) SELECT value FROM json_each(?)", (keys,)
        )
        duplicates += len(latest) - (db.conn.total_changes - before)
    # Read under the write lock, so what the diff is taken against is what is stored.
    stored = dict(
        db.execute(
            "SELECT key, data FROM ref_rows WHERE dataset = ? "
            "AND key IN (SELECT value FROM json_each(?))",
            (dataset, keys),
        ).fetchall()
    )
    created = updated = unchanged = 0
    changes: list[tuple[int, str, str, str | None, str | None, int]] = []
    upserts: list[tuple[str, str, str, int]] = []
    for row in latest.values():
        old = stored.get(row.key)
        if old == row.data:
            unchanged += 1
            continue
        if old is None:
            # A new row is logged whole (no field), so a reader creates it exactly, and one
            # entry stands for all its fields.
            seq = txn.next_seq()
            changes.append((seq, dataset, row.key, None, row.data, 0))
            created += 1
        else:
            fields = _field_changes(orjson.loads(old), row.fields)
            if not fields:
                unchanged += 1
                continue
            seq = txn.next_seq()
            changes.extend((seq, dataset, row.key, name, value, 0) for name, value in fields)
            updated += 1
        upserts.append((dataset, row.key, row.data, seq))
    if upserts:
        db.conn.executemany(_INSERT_CHANGE, changes)
        db.conn.executemany(_UPSERT_ROW, upserts)
        _mark(db, dataset, txn.seq, created)
    return _Chunk(created, updated, 0, unchanged, duplicates, txn.seq if upserts else 0)


def _field_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(field, new canonical JSON value, None when removed) for each field that differs."""
    changed: list[tuple[str, str | None]] = []
    for name, value in new.items():
        text = _canonical(value)
        if name not in old or text != _canonical(old[name]):
            changed.append((name, text))
    changed.extend((name, None) for name in old if name not in new)
    return changed


def _delete_absent(
    dataset: str, seen: str, after: str, scan: int, txn: Transaction
) -> tuple[_Chunk, str | None]:
    """Delete the rows among the next `scan` stored keys after `after` that the import did not
    contain; return what was done and where to go on from (None: the end)."""
    db = txn.db
    rows = db.execute(
        f"""SELECT r.key, s.key IS NULL FROM ref_rows r LEFT JOIN temp.{seen} s ON s.key = r.key
        WHERE r.dataset = ? AND r.key > ? ORDER BY r.key LIMIT ?""",
        (dataset, after, scan),
    ).fetchall()
    absent = [key for key, missing in rows if missing]
    for key in absent:
        seq = txn.next_seq()
        db.execute(_INSERT_CHANGE, (seq, dataset, key, None, None, 1))
        db.execute("DELETE FROM ref_rows WHERE dataset = ? AND key = ?", (dataset, key))
    if absent:
        _mark(db, dataset, txn.seq, -len(absent))
    done = _Chunk(deleted=len(absent), seq=txn.seq if absent else 0)
    return done, (rows[-1][0] if len(rows) == scan else None)


def _mark(db: Database, dataset: str, seq: int, rows: int) -> None:
    at = time.time()
    db.execute(
        """INSERT INTO ref_datasets (dataset, seq, rows, imported_at) VALUES (?, ?, ?, ?)
        ON CONFLICT (dataset) DO UPDATE SET
            seq = excluded.seq, rows = rows + excluded.rows, imported_at = excluded.imported_at""",
        (dataset, seq, rows, at),
    )
    db.execute("INSERT INTO ref_marks (dataset, seq, at) VALUES (?, ?, ?)", (dataset, seq, at))


def _raise_horizon(dataset: str, horizon: int, txn: Transaction) -> None:
    txn.db.execute(
        "UPDATE ref_datasets SET horizon = MAX(horizon, ?) WHERE dataset = ?", (horizon, dataset)
    )
    txn.db.execute("DELETE FROM ref_marks WHERE dataset = ? AND seq <= ?", (dataset, horizon))


def _drop(dataset: str, upto: int, txn: Transaction) -> bool:
    """Delete up to `_COMPACT_ENTRIES` log entries at or below `upto`; whether more remain."""
    cursor = txn.db.execute(
        """DELETE FROM ref_changes WHERE rowid IN (
            SELECT rowid FROM ref_changes WHERE dataset = ? AND seq <= ? LIMIT ?)""",
        (dataset, upto, _COMPACT_ENTRIES),
    )
    return cursor.rowcount == _COMPACT_ENTRIES


# A reader thread, inside one read transaction.


def _head(db: Database) -> int:
    ((seq,),) = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchall()
    return int(seq)


def _info(db: Database, dataset: str) -> DatasetInfo | None:
    row = db.execute(
        "SELECT dataset, seq, horizon, rows FROM ref_datasets WHERE dataset = ?", (dataset,)
    ).fetchone()
    return DatasetInfo(*row) if row else None


def _changes(db: Database, dataset: str, since: int, limit: int) -> ReferencePage:
    head = _head(db)
    info = _info(db, dataset)
    horizon = info.horizon if info else 0
    # Beyond the head: the device holds changes this database does not (it was restored from a
    # backup, or the device synced with another server); a delta cannot repair that.
    if since < horizon or since > head:
        raise ResyncRequired(dataset, since, horizon)
    net: dict[str, _Net] = {}
    seqs = 0
    upto = since
    more = False
    entries = db.execute(_CHANGES_AFTER, (dataset, since))
    for seq, key, field, value, deleted in entries:
        if seq != upto:
            # Whole row changes only: a page ends between two seqs, never inside one.
            if seqs == limit:
                more = True
                break
            seqs += 1
            upto = seq
        entry = net.get(key)
        if entry is None:
            # A creation is logged only for a key that had no row: then the reader has none.
            entry = net[key] = _Net(born=field is None and not deleted)
        if deleted:
            entry.delete()
        elif field is None:
            entry.create(orjson.loads(value))
        elif value is None:
            entry.remove(field)
        else:
            entry.set(field, orjson.loads(value))
    entries.close()
    changes = [entry.change(key) for key, entry in net.items() if not entry.deleted]
    # A row created and deleted again within the page did not exist at `since` either: the
    # reader has nothing to delete.
    deleted_keys = [key for key, entry in net.items() if entry.deleted and not entry.born]
    # The last page ends at the head, not at the dataset's last change: the next `since` then
    # skips every seq committed so far, the other datasets' and documents' ones included.
    return ReferencePage(dataset, since, upto if more else head, changes, deleted_keys, more)


class _Net:
    """One key's changes within a page, folded into what a reader must do."""

    __slots__ = ("born", "deleted", "fields", "removed", "whole")

    def __init__(self, *, born: bool) -> None:
        self.born = born  # the key had no row when the page began
        self.fields: dict[str, Any] = {}
        self.removed: set[str] = set()
        self.whole = False
        self.deleted = False

    def create(self, row: dict[str, Any]) -> None:
        self.fields, self.removed, self.whole, self.deleted = row, set(), True, False

    def delete(self) -> None:
        self.fields, self.removed, self.whole, self.deleted = {}, set(), False, True

    def set(self, field: str, value: Any) -> None:
        self.fields[field] = value
        self.removed.discard(field)

    def remove(self, field: str) -> None:
        self.fields.pop(field, None)
        if not self.whole:  # a whole row simply does not have it
            self.removed.add(field)

    def change(self, key: str) -> RowChange:
        return RowChange(key, self.fields, tuple(sorted(self.removed)), self.whole)


def _compaction_plan(db: Database, before: float) -> list[tuple[str, int, int]]:
    """(dataset, horizon, last seq committed before `before`) for every dataset."""
    return [
        (dataset, horizon, cutoff or 0)
        for dataset, horizon, cutoff in db.execute(
            """SELECT d.dataset, d.horizon,
                (SELECT MAX(m.seq) FROM ref_marks m WHERE m.dataset = d.dataset AND m.at < ?)
            FROM ref_datasets d ORDER BY d.dataset""",
            (before,),
        )
    ]


# The caller's side: rows to chunks, checked before anything of their chunk is written.


async def _chunks(
    rows: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]], size: int
) -> AsyncIterator[list[Mapping[str, Any]]]:
    if isinstance(rows, AsyncIterable):
        chunk: list[Mapping[str, Any]] = []
        async for row in rows:
            chunk.append(row)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        return
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _prepare(row: Mapping[str, Any], key_field: str, position: int) -> _Row:
    # `type(...) is dict` first: rows parsed from JSON are dicts, and an ABC check per row of a
    # million costs more than the rest of this function.
    if type(row) is not dict and not isinstance(row, Mapping):
        raise InvalidRow(f"row {position}: not a JSON object")
    key = row.get(key_field)
    # bool is an int to Python, but True is no asset tag.
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_CHARS:
        raise InvalidRow(
            f"row {position}: {key_field!r} must be a string of 1-{_MAX_KEY_CHARS} characters"
            " or an integer"
        )
    fields = dict(row)  # a copy: the diff runs later, on the writer thread
    try:
        data = orjson.dumps(fields, option=_CANONICAL).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidRow(f"row {position} ({key}): not JSON: {exc}") from None
    return _Row(key, data, fields)


def _canonical(value: Any) -> str:
    return orjson.dumps(value, option=_CANONICAL).decode()


def _add(result: ImportResult, chunk: _Chunk, *, rows: int) -> ImportResult:
    return replace(
        result,
        rows=result.rows + rows,
        created=result.created + chunk.created,
        updated=result.updated + chunk.updated,
        deleted=result.deleted + chunk.deleted,
        unchanged=result.unchanged + chunk.unchanged,
        duplicates=result.duplicates + chunk.duplicates,
        seq=chunk.seq or result.seq,
    )
