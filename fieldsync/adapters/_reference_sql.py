"""`reference_sql`: a table or query of a legacy database feeds a reference dataset (assets,
parts) through `ReferenceStore.import_rows`, which records only the fields that really changed.

A full import reads every row and deletes from the dataset the keys it did not contain; with a
`changed_column`, later polls are incremental: the rows changed since the newest change seen,
less a look-back window for transactions that commit late (reading a row again changes nothing).
An incremental import cannot see deletions: a full one (`fieldsync reference import <name>
--full`, or a poll before any cursor exists) does. Rows stream from a server-side cursor, a
chunk at a time on a thread, so neither the event loop nor memory holds a whole table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fieldsync.adapters._base import Health
from fieldsync.adapters._config import DEFAULT_MAX_ATTEMPTS, AdapterContext, Table
from fieldsync.adapters._inbound import (
    Poller,
    StateFile,
    cursor_text,
    cursor_value,
    engine,
    plain,
    sql_url,
    window_start,
)
from fieldsync.storage import ImportResult, ReferenceStore

__all__ = ["ReferenceSql", "ReferenceSqlConfig", "reference_sql"]

KIND = "reference_sql"
CHUNK_ROWS = 2000  # rows fetched from the server-side cursor per trip to the database


@dataclass(frozen=True)
class ReferenceSqlConfig:
    url: str  # SQLAlchemy URL of the legacy database
    dataset: str  # the reference dataset it feeds: `assets`, `parts`
    table: str | None = None  # `assets` or `schema.assets`, or else
    query: str | None = None  # a SELECT whose rows are the dataset's
    key: str = "id"  # the column naming a row
    interval_s: float | None = None  # None: imports on demand only (the CLI)
    changed_column: str | None = None  # None: every poll is a full import
    lookback_s: float = 300.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # failed polls in a row before health says down

    @classmethod
    def from_table(cls, table: Table) -> ReferenceSqlConfig:
        """The configuration in `[adapters.<name>]`; raises `AdapterConfigError` naming the key."""
        source_table = table.text("table", None)
        query = table.text("query", None)
        if (source_table is None) == (query is None):
            raise table.error("table", "give either `table` or `query`")
        if query is not None and not query.lstrip().lower().startswith(("select", "with")):
            raise table.error("query", "must be a SELECT")
        interval = table.number("interval_s", None, minimum=0.1)
        return cls(
            url=sql_url(table),
            dataset=table.text("dataset"),
            table=source_table,
            query=query.rstrip().rstrip(";") if query else None,
            key=table.text("key", cls.key),
            interval_s=interval,
            changed_column=table.text("changed_column", None),
            lookback_s=table.number("lookback_s", cls.lookback_s, minimum=0),
            max_attempts=table.max_attempts(),
        )


def reference_sql(name: str, table: Table, context: AdapterContext) -> ReferenceSql:
    """The `reference_sql` kind's factory (`KINDS`)."""
    config = ReferenceSqlConfig.from_table(table)
    return ReferenceSql(name, config, context.reference, context.data_dir / "adapters")


class ReferenceSql:
    """The `Adapter` of kind `reference_sql`. `state_dir` holds its state file (the cursor)."""

    kind = KIND

    def __init__(
        self, name: str, config: ReferenceSqlConfig, reference: ReferenceStore, state_dir: Path
    ) -> None:
        self.name = name
        self.config = config
        self.dataset = config.dataset
        self._reference = reference
        self._state = StateFile(state_dir / f"{name}.sqlite", ())
        self._engine: sa.Engine | None = None
        self._poller = Poller(name, config.interval_s, self._poll, config.max_attempts)
        self._counts = {"rows_read": 0, "effects": 0, "imports": 0, "last_seq": 0}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._open()
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()
        await self._state.close()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    async def _open(self) -> None:
        if self._engine is None:
            await self._state.open()
            self._engine = engine(self.config.url)

    def health(self) -> Health:
        return self._poller.health()

    def metrics(self) -> Mapping[str, float]:
        return {**self._counts, "errors": self._poller.errors, "lag_s": self._poller.lag()}

    async def poll_now(self) -> bool:
        """One poll now, as the periodic task makes them; False when it failed (see `health`)."""
        await self._open()
        return await self._poller.poll_now()

    async def _poll(self) -> None:
        await self.import_rows(full=False)

    # --- importing ----------------------------------------------------------------------

    async def count(self, *, full: bool) -> int:
        """How many rows the next import would read (for a progress bar)."""
        await self._open()
        statement = self._statement(await self._since(full), count=True)

        def count() -> int:
            assert self._engine is not None
            with self._engine.connect() as conn:
                return int(conn.execute(statement).scalar_one())

        return await asyncio.to_thread(count)

    async def import_rows(
        self, *, full: bool, progress: Callable[[ImportResult], None] | None = None
    ) -> ImportResult:
        """Import the rows changed since the last import (all of them, deleting the rest,
        when `full`, when there is no `changed_column`, or before any cursor exists)."""
        await self._open()
        since = await self._since(full)
        newest: list[Any] = []
        rows = self._stream(self._statement(since), newest)
        try:
            result = await self._reference.import_rows(
                self.config.dataset,
                rows,
                key=self.config.key,
                full=since is None,
                progress=progress,
            )
        finally:
            await rows.aclose()
        self._counts["rows_read"] += result.rows
        self._counts["effects"] += result.created + result.updated + result.deleted
        self._counts["imports"] += 1
        self._counts["last_seq"] = result.seq or self._counts["last_seq"]
        if self.config.changed_column is not None and newest:
            # Forward only: rows a late transaction committed inside the look-back window may
            # be all an incremental import read.
            cursor = await self._state.get("cursor")
            if cursor is None or newest[0] > cursor_value(cursor):
                await self._state.put("cursor", cursor_text(newest[0]))
        return result

    async def _since(self, full: bool) -> Any:
        """Where an incremental import starts; None: a full import."""
        if full or self.config.changed_column is None:
            return None
        cursor = await self._state.get("cursor")
        if cursor is None:
            return None
        return window_start(cursor_value(cursor), self.config.lookback_s)

    def _statement(self, since: Any, *, count: bool = False) -> sa.TextClause:
        assert self._engine is not None
        quote = self._engine.dialect.identifier_preparer.quote
        if self.config.query is not None:
            source = f"({self.config.query}) AS fieldsync_source"
        else:
            assert self.config.table is not None
            source = ".".join(quote(part) for part in self.config.table.split("."))
        sql = f"SELECT {'COUNT(*)' if count else '*'} FROM {source}"
        if since is None:
            return sa.text(sql)
        assert self.config.changed_column is not None
        sql += f" WHERE {quote(self.config.changed_column)} >= :since"
        return sa.text(sql).bindparams(since=since)

    async def _stream(
        self, statement: sa.TextClause, newest: list[Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The statement's rows as JSON-ready dicts, fetched `CHUNK_ROWS` at a time from a
        server-side cursor on a thread; `newest` ends holding the greatest change time read."""
        assert self._engine is not None
        connection = await asyncio.to_thread(self._engine.connect)
        changed = self.config.changed_column

        def fetch(result: sa.CursorResult[Any]) -> list[dict[str, Any]]:
            names = list(result.keys())
            rows = result.fetchmany(CHUNK_ROWS)
            if changed is not None and changed in names:
                at = names.index(changed)
                stamps = [row[at] for row in rows if row[at] is not None]
                if stamps and (not newest or max(stamps) > newest[0]):
                    newest[:] = [max(stamps)]
            return [dict(zip(names, map(plain, row), strict=True)) for row in rows]

        result: sa.CursorResult[Any] | None = None

        def close() -> None:
            if result is not None:
                result.close()  # reads what a server-side cursor still holds, then ends it
            connection.close()

        try:
            result = await asyncio.to_thread(
                connection.execution_options(yield_per=CHUNK_ROWS).execute, statement
            )
            while chunk := await asyncio.to_thread(fetch, result):
                for row in chunk:
                    yield row
        finally:
            # A stream cut short (a bad row, a stop) still ends its cursor and connection.
            await asyncio.shield(asyncio.to_thread(close))
