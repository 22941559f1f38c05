"""Reference data on PostgreSQL: the same datasets, change log and horizon as SQLite's
(`_reference`, whose row checks, diffing and page folding this reuses), on the tables of
migration 2.

An import chunk draws change sequence numbers, so it is a job of the store's writer, inside a
group commit holding the sequence (its numbers then commit in order, as a document's do). The
next chunk is queued only once the previous one committed, so a device's update waits behind at
most one chunk. The diff of a chunk runs in a thread, off the event loop. Imports into one
dataset are serialised across nodes by a session advisory lock, since a full import's
deletions must not race another import's rows. Compaction draws no number: its steps are
transactions of their own.
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
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import AsyncConnection

from fieldsync.storage._postgres import PgTransaction, PostgresStore, head
from fieldsync.storage._reference import (
    _COMPACT_ENTRIES,
    _SCAN_FACTOR,
    CHUNK_ROWS,
    _add,
    _Chunk,
    _chunks,
    _field_changes,
    _Net,
    _prepare,
    _Row,
)
from fieldsync.storage._sqlite import StorageError
from fieldsync.storage._types import (
    DatasetInfo,
    ImportResult,
    ReferencePage,
    ResyncRequired,
    SnapshotHead,
)

__all__ = ["PostgresReference"]

_T = TypeVar("_T")

# Temporary tables of full imports, unique on the writer's connection.
_IMPORT_IDS = itertools.count(1)
# Advisory lock keys of imports: this class, then the dataset's hash.
_IMPORT_LOCK = 0x7265_66  # "ref"

_UPSERT_ROW = """
    INSERT INTO ref_rows (dataset, key, data, seq) VALUES (%s, %s, %s, %s)
    ON CONFLICT (dataset, key) DO UPDATE SET data = excluded.data, seq = excluded.seq
"""
_INSERT_CHANGE = """
    INSERT INTO ref_changes (seq, dataset, key, field, value, deleted)
    VALUES (%s, %s, %s, %s, %s, %s)
"""
_FETCH = 2000  # change log entries fetched at a time while a page fills


class PostgresReference:
    """The `ReferenceStore` of a `PostgresStore`."""

    def __init__(self, store: PostgresStore, *, chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        self._store = store
        self._chunk_rows = chunk_rows

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
        async with self._exclusive(dataset):
            # The keys a full import has seen: a temporary table on the writer's connection,
            # so 10⁶ keys cost no memory here, and a crash takes it with the connection.
            seen = f"ref_seen_{next(_IMPORT_IDS)}" if full else None
            if seen is not None:
                await self._store.transact(partial(_create_seen, seen))
            try:
                return await self._import(dataset, rows, key, seen, progress)
            finally:
                if seen is not None:
                    # Closed: the connection took its temporary tables along.
                    with contextlib.suppress(StorageError):
                        await self._store.transact(partial(_drop_seen, seen))

    @asynccontextmanager
    async def _exclusive(self, dataset: str) -> AsyncIterator[None]:
        """Hold the dataset's import lock, on every node, for the whole import."""
        try:
            conn = await AsyncConnection.connect(self._store.url, autocommit=True)
        except psycopg.Error as exc:
            raise StorageError("cannot reach the PostgreSQL database") from exc
        try:
            await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_IMPORT_LOCK, dataset))
            yield
        finally:
            await conn.close()  # releases the lock

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
            await settle()
        if seen is not None:
            # Only now that every row has been read: a full import cut short must not delete
            # the rows it did not get to.
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
        return await self._store.query(lambda conn: _changes(conn, dataset, since, limit))

    async def snapshot(
        self, dataset: str, consume: Callable[[SnapshotHead, Iterator[tuple[str, str]]], _T]
    ) -> _T:
        # `consume` runs on a thread and pulls rows as it goes: a connection of that thread's
        # own, streaming from a server-side cursor in one snapshot.
        url = self._store.url

        def read() -> _T:
            with psycopg.connect(url) as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                seq = conn.execute("SELECT value FROM change_seq").fetchone()
                count = conn.execute(
                    "SELECT rows FROM ref_datasets WHERE dataset = %s", (dataset,)
                ).fetchone()
                snapshot = SnapshotHead(dataset, seq[0] if seq else 0, count[0] if count else 0)
                with conn.cursor(name="fieldsync_ref_snapshot") as cursor:
                    cursor.itersize = _FETCH
                    cursor.execute(
                        "SELECT key, data FROM ref_rows WHERE dataset = %s ORDER BY key",
                        (dataset,),
                    )
                    return consume(snapshot, ((key, data) for key, data in cursor))

        try:
            return await asyncio.to_thread(read)
        except psycopg.Error as exc:
            raise StorageError("reading the reference snapshot failed") from exc

    async def rows(self, dataset: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(dict.fromkeys(keys))

        async def read(conn: AsyncConnection) -> dict[str, dict[str, Any]]:
            cursor = await conn.execute(
                "SELECT key, data FROM ref_rows WHERE dataset = %s AND key = ANY(%s)",
                (dataset, wanted),
            )
            return {key: orjson.loads(data) for key, data in await cursor.fetchall()}

        return await self._store.query(read) if wanted else {}

    async def info(self, dataset: str) -> DatasetInfo | None:
        return await self._store.query(lambda conn: _info(conn, dataset))

    async def datasets(self) -> list[DatasetInfo]:
        async def read(conn: AsyncConnection) -> list[DatasetInfo]:
            cursor = await conn.execute(
                "SELECT dataset, seq, horizon, rows FROM ref_datasets ORDER BY dataset"
            )
            return [DatasetInfo(*row) for row in await cursor.fetchall()]

        return await self._store.query(read)

    # Maintenance

    async def compact(self, before: float) -> dict[str, int]:
        """Move each dataset's horizon up to the last change committed before `before` (epoch
        seconds), then drop the log entries at or below it, a bounded number per transaction."""
        plans = await self._store.query(lambda conn: _compaction_plan(conn, before))
        horizons: dict[str, int] = {}
        for dataset, horizon, cutoff in plans:
            if cutoff > horizon:
                # The horizon moves first, in its own commit: from then on no reader is
                # answered from the entries about to go.
                await self._store.run(partial(_raise_horizon, dataset, cutoff))
            horizons[dataset] = upto = max(horizon, cutoff)
            while await self._store.run(partial(_drop, dataset, upto)):
                pass
        return horizons


# The writer, inside the group commit (each job isolated by a savepoint).


async def _create_seen(table: str, txn: PgTransaction) -> None:
    await txn.conn.execute(f'CREATE TEMP TABLE {table} (key TEXT COLLATE "C" PRIMARY KEY)')


async def _drop_seen(table: str, txn: PgTransaction) -> None:
    await txn.conn.execute(f"DROP TABLE IF EXISTS pg_temp.{table}")


def _plan(
    latest: dict[str, _Row], stored: dict[str, str]
) -> tuple[list[tuple[_Row, list[tuple[str, str | None]] | None]], int]:
    """What changed (a row and its field changes, None when it is new) and how many did not:
    on a thread, since parsing and comparing a chunk's rows takes milliseconds."""
    changed: list[tuple[_Row, list[tuple[str, str | None]] | None]] = []
    unchanged = 0
    for row in latest.values():
        old = stored.get(row.key)
        if old == row.data:
            unchanged += 1
        elif old is None:
            changed.append((row, None))
        elif fields := _field_changes(orjson.loads(old), row.fields):
            changed.append((row, fields))
        else:
            unchanged += 1
    return changed, unchanged


async def _apply_chunk(
    dataset: str, rows: list[_Row], seen: str | None, txn: PgTransaction
) -> _Chunk:
    conn = txn.conn
    # The last of a key given twice counts, as it would had the rows been imported one by one.
    latest = {row.key: row for row in rows}
    duplicates = len(rows) - len(latest)
    keys = list(latest)
    if seen is not None:
        cursor = await conn.execute(
            f"INSERT INTO pg_temp.{seen} (key) SELECT unnest(%s::text[])"
            " ON CONFLICT (key) DO NOTHING",
            (keys,),
        )
        duplicates += len(latest) - cursor.rowcount
    # Read under the change sequence's lock, so what the diff is taken against is what is
    # stored.
    cursor = await conn.execute(
        "SELECT key, data FROM ref_rows WHERE dataset = %s AND key = ANY(%s::text[])",
        (dataset, keys),
    )
    stored: dict[str, str] = {key: data for key, data in await cursor.fetchall()}
    changed, unchanged = await asyncio.to_thread(_plan, latest, stored)
    created = updated = 0
    changes: list[tuple[int, str, str, str | None, str | None, bool]] = []
    upserts: list[tuple[str, str, str, int]] = []
    for row, fields in changed:
        seq = txn.next_seq()
        if fields is None:
            # A new row is logged whole (no field): one entry stands for all its fields.
            changes.append((seq, dataset, row.key, None, row.data, False))
            created += 1
        else:
            changes.extend((seq, dataset, row.key, name, value, False) for name, value in fields)
            updated += 1
        upserts.append((dataset, row.key, row.data, seq))
    if upserts:
        async with conn.cursor() as cursor:
            await cursor.executemany(_INSERT_CHANGE, changes)
            await cursor.executemany(_UPSERT_ROW, upserts)
        await _mark(conn, dataset, txn.seq, created)
    return _Chunk(created, updated, 0, unchanged, duplicates, txn.seq if upserts else 0)


async def _delete_absent(
    dataset: str, seen: str, after: str, scan: int, txn: PgTransaction
) -> tuple[_Chunk, str | None]:
    """Delete the rows among the next `scan` stored keys after `after` that the import did not
    contain; return what was done and where to go on from (None: the end)."""
    conn = txn.conn
    cursor = await conn.execute(
        f"""SELECT r.key, s.key IS NULL FROM ref_rows r
        LEFT JOIN pg_temp.{seen} s ON s.key = r.key
        WHERE r.dataset = %s AND r.key > %s ORDER BY r.key LIMIT %s""",
        (dataset, after, scan),
    )
    rows = await cursor.fetchall()
    absent = [key for key, missing in rows if missing]
    if absent:
        seqs = [txn.next_seq() for _ in absent]
        async with conn.cursor() as cursor:
            await cursor.executemany(
                _INSERT_CHANGE,
                [
                    (seq, dataset, key, None, None, True)
                    for seq, key in zip(seqs, absent, strict=True)
                ],
            )
        await conn.execute(
            "DELETE FROM ref_rows WHERE dataset = %s AND key = ANY(%s::text[])", (dataset, absent)
        )
        await _mark(conn, dataset, txn.seq, -len(absent))
    done = _Chunk(deleted=len(absent), seq=txn.seq if absent else 0)
    return done, (rows[-1][0] if len(rows) == scan else None)


async def _mark(conn: AsyncConnection, dataset: str, seq: int, rows: int) -> None:
    at = time.time()
    await conn.execute(
        """INSERT INTO ref_datasets (dataset, seq, rows, imported_at) VALUES (%s, %s, %s, %s)
        ON CONFLICT (dataset) DO UPDATE SET seq = excluded.seq,
            rows = ref_datasets.rows + excluded.rows, imported_at = excluded.imported_at""",
        (dataset, seq, rows, at),
    )
    await conn.execute(
        "INSERT INTO ref_marks (dataset, seq, at) VALUES (%s, %s, %s)", (dataset, seq, at)
    )


# Compaction, each step its own transaction.


async def _raise_horizon(dataset: str, horizon: int, conn: AsyncConnection) -> None:
    await conn.execute(
        "UPDATE ref_datasets SET horizon = greatest(horizon, %s) WHERE dataset = %s",
        (horizon, dataset),
    )
    await conn.execute("DELETE FROM ref_marks WHERE dataset = %s AND seq <= %s", (dataset, horizon))


async def _drop(dataset: str, upto: int, conn: AsyncConnection) -> bool:
    """Delete up to `_COMPACT_ENTRIES` log entries at or below `upto`; whether more remain."""
    cursor = await conn.execute(
        """DELETE FROM ref_changes WHERE id IN (
            SELECT id FROM ref_changes WHERE dataset = %s AND seq <= %s LIMIT %s)""",
        (dataset, upto, _COMPACT_ENTRIES),
    )
    return cursor.rowcount == _COMPACT_ENTRIES


# Reads, in one snapshot.


async def _info(conn: AsyncConnection, dataset: str) -> DatasetInfo | None:
    cursor = await conn.execute(
        "SELECT dataset, seq, horizon, rows FROM ref_datasets WHERE dataset = %s", (dataset,)
    )
    row = await cursor.fetchone()
    return DatasetInfo(*row) if row else None


async def _changes(conn: AsyncConnection, dataset: str, since: int, limit: int) -> ReferencePage:
    top = await head(conn)
    info = await _info(conn, dataset)
    horizon = info.horizon if info else 0
    # Beyond the head: the device holds changes this database does not; a delta cannot repair
    # that.
    if since < horizon or since > top:
        raise ResyncRequired(dataset, since, horizon)
    entries: list[tuple[int, str, str | None, str | None, bool]] = []
    seqs = 0
    upto = since
    more = False
    # A server-side cursor: a page takes what it needs of a long log, not all of it.
    async with conn.cursor(name="fieldsync_ref_changes") as cursor:
        cursor.itersize = _FETCH
        await cursor.execute(
            """SELECT seq, key, field, value, deleted FROM ref_changes
            WHERE dataset = %s AND seq > %s ORDER BY seq, id""",
            (dataset, since),
        )
        async for entry in cursor:
            seq = entry[0]
            if seq != upto:
                # Whole row changes only: a page ends between two seqs, never inside one.
                if seqs == limit:
                    more = True
                    break
                seqs += 1
                upto = seq
            entries.append(entry)
    changes, deleted = await asyncio.to_thread(_fold, entries)
    # The last page ends at the head: the next `since` then skips every seq committed so far.
    return ReferencePage(dataset, since, upto if more else top, changes, deleted, more)


def _fold(
    entries: list[tuple[int, str, str | None, str | None, bool]],
) -> tuple[list[Any], list[str]]:
    """A page's entries folded per key (as `_reference._changes` does), on a thread."""
    net: dict[str, _Net] = {}
    for _, key, field, value, deleted in entries:
        entry = net.get(key)
        if entry is None:
            entry = net[key] = _Net(born=field is None and not deleted)
        if deleted:
            entry.delete()
        elif field is None:
            assert value is not None
            entry.create(orjson.loads(value))
        elif value is None:
            entry.remove(field)
        else:
            entry.set(field, orjson.loads(value))
    changes = [entry.change(key) for key, entry in net.items() if not entry.deleted]
    deleted_keys = [key for key, entry in net.items() if entry.deleted and not entry.born]
    return changes, deleted_keys


async def _compaction_plan(conn: AsyncConnection, before: float) -> list[tuple[str, int, int]]:
    cursor = await conn.execute(
        """SELECT d.dataset, d.horizon,
            (SELECT MAX(m.seq) FROM ref_marks m WHERE m.dataset = d.dataset AND m.at < %s)
        FROM ref_datasets d ORDER BY d.dataset""",
        (before,),
    )
    return [(dataset, horizon, cutoff or 0) for dataset, horizon, cutoff in await cursor.fetchall()]
