"""`erp_inbound_sql`: released orders in an ERP table become work orders.

Each order is the work order `wo:erp-<key>`, created and edited through the device write path as
the adapter's service principal (`DocumentWriter`), so scopes, rules, field history and fan-out
apply to it as to anyone's edit. Only the ERP's own changes are written: a field is set when the
ERP's value changed since the last one applied, so what the people in fieldsync changed meanwhile
merges with it like any concurrent edit rather than being overwritten with a stale copy.

The table is polled by its change column: rows changed at or after the newest change seen, less
a look-back window. An ERP stamps `changed_at` when its transaction writes the row, not when it
commits, so a long transaction can commit a row stamped before one already read: rows of the
window are read again, and what was applied is remembered per order (change time and a hash of
the mapped values) in the adapter's state file, so each version is applied once. A row whose
edit fails is retried at each poll up to `max_attempts`, then set aside with its error (a
dead letter) until the ERP changes it again: one bad order never holds up the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import sqlalchemy as sa
from pycrdt import Doc, Map

from fieldsync.adapters._base import DocumentWriter, Health, HealthState
from fieldsync.adapters._config import DEFAULT_MAX_ATTEMPTS, AdapterContext, Table
from fieldsync.adapters._inbound import (
    Poller,
    StateFile,
    cursor_text,
    cursor_value,
    engine,
    plain,
    sql_url,
    table,
    window_start,
)
from fieldsync.documents import work_order, work_order_rules
from fieldsync.records import Origin, OriginKind
from fieldsync.replication import SERVICE_ROLE

__all__ = ["ErpInboundSql", "ErpInboundSqlConfig", "erp_inbound_sql"]

log = logging.getLogger(__name__)

KIND = "erp_inbound_sql"
# Work-order field -> ERP column, unless `columns` says otherwise (DESIGN.md §2's fields).
DEFAULT_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        name: name
        for name in (
            "number",
            "title",
            "priority",
            "asset_id",
            "site",
            "team",
            "region",
            "due_at",
            "status",
        )
    }
)
# Fields an ERP may also feed through `columns`.
FIELDS = frozenset(DEFAULT_COLUMNS) | {"description", "assignee"}
# ERP status -> work-order status. An order whose ERP status is not here is not released (yet):
# no work order is made for it, and an existing one keeps its status.
DEFAULT_STATUSES: Mapping[str, str] = MappingProxyType(
    {"released": "new", "cancelled": "cancelled"}
)
_NOT_CREATED_AS = frozenset({"cancelled", "closed"})  # nothing to create for such an order
_PAGE = 500  # rows read per query

_SCHEMA = (
    # Per ERP key: the version last applied (its change time as text, a hash of its mapped
    # values, and the values, which the next version is compared with), and the version that
    # failed since, if any (its hash, attempts, last error, and whether it was set aside).
    """CREATE TABLE IF NOT EXISTS orders (
        key TEXT PRIMARY KEY,
        changed_at TEXT,
        hash TEXT,
        fields TEXT,
        failed_hash TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        dead INTEGER NOT NULL DEFAULT 0
    )""",
)


@dataclass(frozen=True)
class ErpInboundSqlConfig:
    url: str  # SQLAlchemy URL of the ERP database
    table: str  # `orders` or `schema.orders`
    key_column: str = "order_no"
    changed_column: str = "changed_at"
    interval_s: float = 30.0
    lookback_s: float = 300.0  # longer than the ERP's longest transaction
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    columns: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    statuses: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_STATUSES))

    @classmethod
    def from_table(cls, table: Table) -> ErpInboundSqlConfig:
        """The configuration in `[adapters.<name>]`; raises `AdapterConfigError` naming the key."""
        columns = table.table("columns", optional=True)
        fields = columns.keys()  # a Table is not a dict: its keys are a list
        for name in fields:
            if name not in FIELDS:
                raise columns.error(name, f"not a work-order field an ERP feeds: {sorted(FIELDS)}")
        statuses = table.table("statuses", optional=True)
        erp_statuses = statuses.keys()
        return cls(
            url=sql_url(table),
            table=table.text("table"),
            key_column=table.text("key_column", cls.key_column),
            changed_column=table.text("changed_column", cls.changed_column),
            interval_s=table.number("interval_s", cls.interval_s, minimum=0.1),
            lookback_s=table.number("lookback_s", cls.lookback_s, minimum=0),
            max_attempts=table.max_attempts(),
            columns={**DEFAULT_COLUMNS, **{k: columns.text(k) for k in fields}},
            statuses={
                **DEFAULT_STATUSES,
                **{k: statuses.choice(k, work_order_rules.STATUSES) for k in erp_statuses},
            },
        )


def erp_inbound_sql(name: str, table: Table, context: AdapterContext) -> ErpInboundSql:
    """The `erp_inbound_sql` kind's factory (`KINDS`): it needs the write path."""
    config = ErpInboundSqlConfig.from_table(table)
    if context.writer is None:
        raise table.error(None, "erp_inbound_sql writes work orders: it needs the write path")
    return ErpInboundSql(name, config, context.writer, context.data_dir / "adapters")


@dataclass(frozen=True, slots=True)
class _Memory:
    """What the adapter remembers of one order (a row of its `orders` table)."""

    key: str
    changed_at: str | None = None
    hash: str | None = None
    fields: str | None = None  # canonical JSON of the mapped values last applied
    failed_hash: str | None = None
    attempts: int = 0
    error: str | None = None
    dead: bool = False


class ErpInboundSql:
    """The `Adapter` of kind `erp_inbound_sql`. `state_dir` holds its state file."""

    kind = KIND

    def __init__(
        self, name: str, config: ErpInboundSqlConfig, writer: DocumentWriter, state_dir: Path
    ) -> None:
        self.name = name
        self.config = config
        self.origin = Origin(OriginKind.ADAPTER, name)
        self._writer = writer
        self._state = StateFile(state_dir / f"{name}.sqlite", _SCHEMA)
        self._engine: sa.Engine | None = None
        self._poller = Poller(name, config.interval_s, self._poll, config.max_attempts)
        # Each column once, however many fields read it (`number` may be the key column).
        self._columns = list(
            dict.fromkeys((config.key_column, config.changed_column, *config.columns.values()))
        )
        self._table = table(config.table, *self._columns)
        self._counts = {"rows_read": 0, "effects": 0, "skipped": 0, "failed": 0}
        self._set_aside: tuple[int, str] = (0, "")  # how many orders, and the latest one's error

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
        """Degraded while the ERP cannot be read, and while orders are set aside: an operator
        fixes them at the ERP (their next change is applied afresh)."""
        health = self._poller.health()
        count, latest = self._set_aside
        if health.state is HealthState.OK and count:
            return Health(HealthState.DEGRADED, f"{count} order(s) set aside; latest: {latest}")
        return health

    def metrics(self) -> Mapping[str, float]:
        return {
            **self._counts,
            "set_aside": self._set_aside[0],
            "errors": self._poller.errors,
            "lag_s": self._poller.lag(),
        }

    async def poll_now(self) -> bool:
        """One poll now, as the periodic task makes them; False when it failed (see `health`)."""
        await self._open()
        return await self._poller.poll_now()

    # --- polling ------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Apply every order changed since the window start; move the cursor past what is
        settled (applied, or set aside), never past an order still to be retried."""
        cursor = await self._state.get("cursor")
        lookback = self.config.lookback_s
        since = None if cursor is None else window_start(cursor_value(cursor), lookback)
        after: tuple[Any, Any] | None = None
        newest: Any = None
        retry_from: Any = None
        while not self._poller.stopping:
            rows = await asyncio.to_thread(self._read_page, since, after)
            keys = [str(row[self.config.key_column]) for row in rows]
            memories = await self._state.run(partial(_remembered, keys))
            remember = []
            for key, row in zip(keys, rows, strict=True):
                changed = row[self.config.changed_column]
                memory, retry = await self._apply(
                    key, changed, row, memories.get(key) or _Memory(key)
                )
                if memory is not None:
                    remember.append(memory)
                if retry:  # the cursor must not move past it: it is read again next time
                    retry_from = changed if retry_from is None else min(retry_from, changed)
                newest = changed if newest is None else max(newest, changed)
                if self._poller.stopping:
                    break
            await self._state.run(partial(_remember, remember))
            if len(rows) < _PAGE or self._poller.stopping:
                break
            after = (rows[-1][self.config.changed_column], rows[-1][self.config.key_column])
        if newest is not None:
            stop_at = newest if retry_from is None else min(newest, retry_from)
            if cursor is None or stop_at > cursor_value(cursor):
                await self._state.put("cursor", cursor_text(stop_at))
        self._set_aside = await self._state.run(_set_aside)

    def _read_page(self, since: Any, after: tuple[Any, Any] | None) -> list[dict[str, Any]]:
        """One page of rows (column -> value) in (change, key) order, from `since` on, after
        the (change, key) position `after`."""
        assert self._engine is not None
        key = self._table.c[self.config.key_column]
        changed = self._table.c[self.config.changed_column]
        query = sa.select(*(self._table.c[name] for name in self._columns))
        query = query.where(changed.is_not(None))
        if since is not None:
            query = query.where(changed >= since)
        if after is not None:
            query = query.where(sa.tuple_(changed, key) > sa.tuple_(*after))
        query = query.order_by(changed, key).limit(_PAGE)
        with self._engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    async def _apply(
        self, key: str, changed: Any, columns: Mapping[str, Any], memory: _Memory
    ) -> tuple[_Memory | None, bool]:
        """Apply one row unless this version was applied (or set aside) already. Returns what
        to remember of the order (None: nothing new) and whether it is to be tried again."""
        self._counts["rows_read"] += 1
        row = {field: plain(columns[column]) for field, column in self.config.columns.items()}
        text = orjson.dumps(row, option=orjson.OPT_SORT_KEYS).decode()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if memory.hash == digest or (memory.failed_hash == digest and memory.dead):
            self._counts["skipped"] += 1
            return None, False
        before = orjson.loads(memory.fields) if memory.fields is not None else None
        change = self._change(key, row, before)
        try:
            seq = await self._writer.edit(f"wo:erp-{key}", change, self.origin)
        except Exception as exc:
            self._counts["failed"] += 1
            # Attempts count per version: a new version of a set-aside order starts afresh.
            attempts = (memory.attempts if memory.failed_hash == digest else 0) + 1
            error = f"{type(exc).__name__}: {exc}"
            dead = attempts >= self.config.max_attempts
            log.warning(
                "adapter %s: order %s failed (attempt %d of %d): %s%s",
                self.name,
                key,
                attempts,
                self.config.max_attempts,
                error,
                "; set aside until the ERP changes it" if dead else "",
            )
            return replace(
                memory, failed_hash=digest, attempts=attempts, error=error, dead=dead
            ), not dead
        self._counts["effects"] += seq is not None
        return _Memory(key, cursor_text(changed), digest, text), False

    def _change(
        self, key: str, row: Mapping[str, Any], before: Mapping[str, Any] | None
    ) -> Callable[[Doc[Any]], None]:
        """The edit that brings the ERP's change of order `key` into its work order: on an
        empty document, the whole work order, if the order is released; on an existing one,
        the fields whose ERP value changed since `before` (the version last applied; None:
        unknown, every field) and differs from the document's."""
        by = str(self.origin)
        status = self.config.statuses.get(str(row.get("status")))
        values = {name: value for name, value in row.items() if name != "status"}

        def change(doc: Doc[Any]) -> None:
            fields = doc.get("fields", type=Map)
            if not fields:
                if status is None or status in _NOT_CREATED_AS:
                    return  # not released: no work order yet
                created = {k: v for k, v in values.items() if v is not None}
                created.update(status=status, erp_ref=key)
                work_order.write(doc, created, by=by, role=SERVICE_ROLE)
                return
            for name, value in values.items():
                if (before is None or before.get(name) != value) and fields.get(name) != value:
                    fields[name] = value
            erp_status_changed = before is None or before.get("status") != row.get("status")
            if status is not None and erp_status_changed and fields.get("status") != status:
                work_order.set_status(doc, status, by=by, role=SERVICE_ROLE)

        return change


def _remembered(keys: list[str], conn: sqlite3.Connection) -> dict[str, _Memory]:
    found: dict[str, _Memory] = {}
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        marks = ",".join("?" * len(part))
        for row in conn.execute(f"SELECT * FROM orders WHERE key IN ({marks})", part):
            key, changed_at, digest, fields, failed_hash, attempts, error, dead = row
            found[key] = _Memory(
                key, changed_at, digest, fields, failed_hash, attempts, error, bool(dead)
            )
    return found


def _set_aside(conn: sqlite3.Connection) -> tuple[int, str]:
    count = conn.execute("SELECT count(*) FROM orders WHERE dead").fetchone()[0]
    latest = conn.execute(
        "SELECT key, error FROM orders WHERE dead ORDER BY rowid DESC LIMIT 1"
    ).fetchone()
    return count, f"{latest[0]}: {latest[1]}" if latest else ""


def _remember(memories: list[_Memory], conn: sqlite3.Connection) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (m.key, m.changed_at, m.hash, m.fields, m.failed_hash, m.attempts, m.error, m.dead)
            for m in memories
        ],
    )
