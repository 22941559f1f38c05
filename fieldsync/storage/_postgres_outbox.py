"""The PostgreSQL backend's `Outbox` (schema: migration 7). Entries are written by the store's
writer in the transaction of their update (`PostgresStore.set_outbox_routes`); the runner's and
the operators' changes are transactions of their own, since they draw no change sequence
number. Several nodes may run a runner over one outbox: each change of state is one conditional
UPDATE, so two of them marking the same entries count them once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection

from fieldsync.storage._outbox import (
    DueDoc,
    OutboxEntry,
    OutboxError,
    OutboxState,
    OutboxStats,
    Routes,
)
from fieldsync.storage._postgres import PostgresStore

__all__ = ["PostgresOutbox"]

_COLUMNS = (
    "id, adapter, doc, seq, state, attempts, created_at, updated_at, next_at,"
    " error_code, error_message, error_entity"
)
# A document with a dead entry for the adapter waits for an operator.
_NOT_DEAD = """NOT EXISTS (SELECT 1 FROM outbox d WHERE d.state = 'dead'
    AND d.adapter = o.adapter AND d.doc = o.doc)"""


def _entry(row: Any) -> OutboxEntry:
    (id_, adapter, doc, seq, state, attempts, created, updated, next_at, code, message, entity) = (
        row
    )
    error = OutboxError(code, message or "", entity) if code is not None else None
    return OutboxEntry(
        id_, adapter, doc, seq, OutboxState(state), attempts, created, updated, next_at, error
    )


async def _select(conn: AsyncConnection, entry_id: int) -> OutboxEntry | None:
    cursor = await conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = %s", (entry_id,))
    row = await cursor.fetchone()
    return _entry(row) if row else None


class PostgresOutbox:
    """The `Outbox` of a `PostgresStore`."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def route(self, routes: Routes, notify: Callable[[], None] | None = None) -> None:
        self._store.set_outbox_routes(routes, notify)

    async def due(self, adapter: str, now: float, limit: int) -> list[DueDoc]:
        async def read(conn: AsyncConnection) -> list[DueDoc]:
            cursor = await conn.execute(
                f"""SELECT o.doc, MIN(o.seq), MAX(o.seq), MAX(o.attempts) FROM outbox o
                WHERE o.state = 'pending' AND o.adapter = %(adapter)s AND {_NOT_DEAD}
                GROUP BY o.doc
                -- every entry due: a change committed after a failure waits with the rest
                HAVING MAX(o.next_at) <= %(now)s
                ORDER BY MIN(o.seq) LIMIT %(limit)s""",
                {"adapter": adapter, "now": now, "limit": limit},
            )
            return [
                DueDoc(adapter, doc, first, last, attempts)
                for doc, first, last, attempts in await cursor.fetchall()
            ]

        return await self._store.query(read)

    async def next_due(self, adapter: str) -> float | None:
        async def read(conn: AsyncConnection) -> float | None:
            cursor = await conn.execute(
                f"""SELECT MIN(due) FROM (
                    SELECT MAX(o.next_at) AS due FROM outbox o
                    WHERE o.state = 'pending' AND o.adapter = %s AND {_NOT_DEAD}
                    GROUP BY o.doc) AS docs""",
                (adapter,),
            )
            row = await cursor.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._store.query(read)

    async def delivered(self, adapter: str, doc: str, upto_seq: int, now: float) -> int:
        return await self._write(
            """UPDATE outbox SET state = 'delivered', updated_at = %(now)s, error_code = NULL,
                error_message = NULL, error_entity = NULL
            WHERE adapter = %(adapter)s AND doc = %(doc)s AND seq <= %(upto)s
              AND state = 'pending'""",
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
            """UPDATE outbox SET state = %(state)s, attempts = attempts + 1,
                next_at = %(next_at)s, updated_at = %(now)s, error_code = %(code)s,
                error_message = %(message)s, error_entity = %(entity)s
            WHERE adapter = %(adapter)s AND doc = %(doc)s AND seq <= %(upto)s
              AND state = 'pending'""",
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
        where: list[str] = ["id > %s"]
        params: list[object] = [after_id or 0]
        for column, value in (("adapter", adapter), ("state", state), ("doc", doc)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(str(value))

        async def read(conn: AsyncConnection) -> list[OutboxEntry]:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE {' AND '.join(where)} ORDER BY id LIMIT %s",
                [*params, limit],
            )
            return [_entry(row) for row in await cursor.fetchall()]

        return await self._store.query(read)

    async def entry(self, entry_id: int) -> OutboxEntry | None:
        return await self._store.query(lambda conn: _select(conn, entry_id))

    async def retry(self, entry_id: int, now: float) -> OutboxEntry | None:
        async def work(conn: AsyncConnection) -> OutboxEntry | None:
            entry = await _select(conn, entry_id)
            if entry is None:
                return None
            params = {"id": entry_id, "adapter": entry.adapter, "doc": entry.doc, "now": now}
            await conn.execute(
                """UPDATE outbox SET state = 'pending', attempts = 0, next_at = %(now)s,
                    updated_at = %(now)s
                WHERE id = %(id)s
                   OR (adapter = %(adapter)s AND doc = %(doc)s AND state = 'dead')""",
                params,
            )
            # Pending entries of the document waiting out a backoff go along, now.
            await conn.execute(
                """UPDATE outbox SET next_at = %(now)s
                WHERE adapter = %(adapter)s AND doc = %(doc)s AND state = 'pending'""",
                params,
            )
            return await _select(conn, entry_id)

        return await self._store.run(work)

    async def skip(self, entry_id: int, now: float) -> OutboxEntry | None:
        async def work(conn: AsyncConnection) -> OutboxEntry | None:
            entry = await _select(conn, entry_id)
            if entry is None:
                return None
            await conn.execute(
                """UPDATE outbox SET state = 'skipped', updated_at = %(now)s
                WHERE adapter = %(adapter)s AND doc = %(doc)s AND seq <= %(seq)s
                  AND state IN ('pending', 'dead')""",
                {"adapter": entry.adapter, "doc": entry.doc, "seq": entry.seq, "now": now},
            )
            return await _select(conn, entry_id)

        return await self._store.run(work)

    async def replay(self, adapter: str, from_seq: int, now: float) -> int:
        return await self._write(
            """UPDATE outbox SET state = 'pending', attempts = 0, next_at = %(now)s,
                updated_at = %(now)s
            WHERE adapter = %(adapter)s AND seq >= %(from_seq)s""",
            {"adapter": adapter, "from_seq": from_seq, "now": now},
        )

    async def stats(self) -> dict[str, OutboxStats]:
        async def read(conn: AsyncConnection) -> dict[str, OutboxStats]:
            cursor = await conn.execute(
                """SELECT adapter,
                    count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'dead'),
                    MIN(created_at) FILTER (WHERE state = 'pending')
                FROM outbox WHERE state IN ('pending', 'dead') GROUP BY adapter"""
            )
            return {
                adapter: OutboxStats(int(pending), int(dead), oldest)
                for adapter, pending, dead, oldest in await cursor.fetchall()
            }

        return await self._store.query(read)

    async def purge(self, before: float) -> int:
        return await self._write(
            """DELETE FROM outbox WHERE state IN ('delivered', 'skipped')
              AND updated_at < %(before)s""",
            {"before": before},
        )

    async def _write(self, sql: str, params: dict[str, object]) -> int:
        async def work(conn: AsyncConnection) -> int:
            cursor = await conn.execute(sql, params)
            return cursor.rowcount

        return await self._store.run(work)
