"""What the polling inbound adapters (`erp_inbound_sql`, `reference_sql`) share: the polling
task with its health and metrics, the adapter's own small durable state, and reading a foreign
SQL database off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from fieldsync.adapters._base import Health, HealthState
from fieldsync.adapters._config import Table

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def sql_url(table: Table, key: str = "url") -> str:
    """A SQLAlchemy database URL (`postgresql+psycopg://…`, `mariadb+pymysql://…`); it may hold
    a password, so it is read as a secret, never quoted back."""
    text = table.secret(key)
    try:
        sa.engine.make_url(text)
    except sa.exc.ArgumentError:
        raise table.error(key, "is not a SQLAlchemy database URL") from None
    return text


def engine(url: str) -> sa.Engine:
    """An engine for a foreign database that fails fast when the database is unreachable (the
    poll reports it and tries again), checking pooled connections before use."""
    made = sa.engine.make_url(url)
    args: dict[str, Any] = {}
    if made.get_backend_name() in ("postgresql", "mysql", "mariadb"):
        args["connect_timeout"] = 10
    return sa.create_engine(made, pool_pre_ping=True, pool_size=1, connect_args=args)


def table(name: str, *columns: str) -> sa.TableClause:
    """A table of a foreign database by name (`schema.table` allowed), with just the columns
    named: no reflection, so nothing is read from the database before the first poll."""
    schema, _, bare = name.rpartition(".")
    return sa.table(bare, *(sa.column(c) for c in columns), schema=schema or None)


_AS_IS = frozenset({str, int, float, bool, type(None)})


def plain(value: Any) -> Any:
    """A value read from a foreign database as JSON holds it: times as ISO 8601 text, decimals
    as numbers, bytes as hex."""
    if type(value) in _AS_IS:  # most values: one set lookup per value of 10⁶ rows
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def cursor_text(value: Any) -> str:
    """A change column's value as a cursor is kept in a state file: a time, or a number (epoch
    seconds, a row version), tagged so that `cursor_value` gives back what it was."""
    if isinstance(value, dt.datetime):
        return "t:" + value.isoformat()
    return "n:" + repr(float(value))


def cursor_value(text: str) -> Any:
    kind, _, value = text.partition(":")
    return dt.datetime.fromisoformat(value) if kind == "t" else float(value)


def window_start(cursor: Any, seconds: float) -> Any:
    """Where a poll starts reading: `seconds` before `cursor`, for rows stamped before it that
    committed after it was read."""
    if isinstance(cursor, dt.datetime):
        return cursor - dt.timedelta(seconds=seconds)
    return cursor - seconds


class StateFile:
    """An adapter's own durable memory (its cursor, what it applied), a SQLite file in the data
    dir beside the store: small, written by this adapter only, every call on a thread."""

    def __init__(self, path: Path, schema: tuple[str, ...]) -> None:
        self.path = path
        self._schema = schema
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement sequence at a time on the connection

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value)")
            for statement in self._schema:
                conn.execute(statement)
            return conn

        self._conn = await asyncio.to_thread(connect)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    async def run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `work` in one transaction on a thread."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"{self.path} is not open")

        def transaction() -> _T:
            with self._lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result

        return await asyncio.to_thread(transaction)

    async def get(self, name: str) -> Any:
        def read(conn: sqlite3.Connection) -> Any:
            row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
            return row[0] if row else None

        return await self.run(read)

    async def put(self, name: str, value: Any) -> None:
        await self.run(
            lambda conn: conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        )


class Poller:
    """The periodic task of a polling adapter: `poll` every `interval_s` seconds until stopped,
    a failed poll reported in `health` (degraded, with its error; down after `max_attempts` in a
    row) and retried at the next tick, while what the last good poll brought stays in place."""

    def __init__(
        self,
        name: str,
        interval_s: float | None,
        poll: Callable[[], Awaitable[None]],
        max_attempts: int,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._poll = poll
        self.max_attempts = max_attempts  # failed polls in a row before health says down
        self._failing = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._gate = asyncio.Lock()  # one poll at a time, whoever asks for it
        self.errors = 0
        self.last_error: str | None = None
        self.last_success: float | None = None  # epoch seconds when the last good poll began
        self._made = time.time()

    @property
    def stopping(self) -> bool:
        """A poll checks this between items and returns early: stop waits for that."""
        return self._stop.is_set()

    def start(self) -> None:
        if self.interval_s is None or (self._task is not None and not self._task.done()):
            return
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name=f"adapter-{self.name}")

    async def stop(self, grace: float = 10.0) -> None:
        """Let the poll in hand finish its current item (it checks `stopping`), then end; a
        poll still waiting on its database after `grace` seconds is cancelled."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        assert self.interval_s is not None
        while not self._stop.is_set():
            await self.poll_now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def poll_now(self) -> bool:
        """Poll once now (after the poll in progress, if any); False when it failed, its error
        logged and kept for `health`."""
        async with self._gate:
            began = time.time()
            try:
                await self._poll()
            except Exception as exc:
                self.errors += 1
                self._failing += 1
                self.last_error = f"{type(exc).__name__}: {_safe(exc)}"
                log.warning("adapter %s: poll failed: %s", self.name, self.last_error)
                return False
            self.last_error = None
            self._failing = 0
            self.last_success = began
            return True

    def health(self) -> Health:
        if self.last_error is not None:
            kept = "; keeping what the last good poll brought" if self.last_success else ""
            state = HealthState.DOWN if self._failing >= self.max_attempts else HealthState.DEGRADED
            return Health(state, f"{self._failing} failed poll(s): {self.last_error}{kept}")
        if self.last_success is None:
            return Health(HealthState.OK, "not polled yet")
        return Health(HealthState.OK)

    def lag(self) -> float:
        """Seconds since the last good poll began (since the adapter was made, before one):
        how stale fieldsync's copy may be."""
        return time.time() - (self.last_success or self._made)


def _safe(exc: Exception) -> str:
    """An error's message without what a driver may echo of the URL (its password): SQLAlchemy
    errors carry the statement and parameters too, which are kept out of the log."""
    if isinstance(exc, sa.exc.StatementError):
        return str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
