"""`erp_sql`: work orders projected into an ERP's tables in PostgreSQL, MariaDB or SQLite
(SQLAlchemy Core, its sync engine in worker threads: no database work on the event loop).

Exactly-once effect: a delivery writes the order's rows and the adapter's record of the last
seq applied to the document (`fieldsync_erp_applied`) in one transaction of the target, after
locking that record; a delivery whose seq is not newer changes nothing. Whatever was cut off (a
killed fieldsync, a terminated connection) rolled back whole, and the retry makes the rows equal
to the projection of the document (`_erp_mapping`), with no confirmation twice or missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url

from fieldsync.adapters._base import (
    Delivery,
    DeliveryError,
    Health,
    HealthState,
)
from fieldsync.adapters._config import DEFAULT_MAX_ATTEMPTS, AdapterContext, Table
from fieldsync.adapters._erp_mapping import (
    ColumnType,
    Entity,
    ErpMapping,
    ProjectionError,
    Row,
    read_mapping,
)

log = logging.getLogger(__name__)

KIND = "erp_sql"
APPLIED = "fieldsync_erp_applied"  # the adapter's own record: (adapter, doc) → last seq
# The drivers this adapter ships with, for a URL that names none.
DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql", "sqlite": "pysqlite"}
SCHEMES = (*DRIVERS, *(f"{backend}+{driver}" for backend, driver in DRIVERS.items()))


@dataclass(frozen=True, slots=True)
class ErpSqlConfig:
    url: URL
    mapping: ErpMapping
    create_schema: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    @classmethod
    def from_table(cls, table: Table) -> Self:
        text = table.url("url", SCHEMES)
        try:
            url = make_url(text)
        except exc.ArgumentError:
            raise table.error("url", "is not a SQLAlchemy database URL") from None
        backend = url.get_backend_name()
        if "+" not in url.drivername:
            url = url.set(drivername=f"{backend}+{DRIVERS[backend]}")
        return cls(
            url=url,
            mapping=read_mapping(table),
            create_schema=table.flag("create_schema", False),
            max_attempts=table.max_attempts(),
        )


def build(name: str, table: Table, context: AdapterContext) -> ErpSqlAdapter:
    """The `erp_sql` kind's factory (`KINDS`)."""
    return ErpSqlAdapter(name, ErpSqlConfig.from_table(table))


def tables(mapping: ErpMapping, metadata: sa.MetaData | None = None) -> dict[str, sa.Table]:
    """The target's tables as the mapping describes them (by entity kind), and the adapter's
    own record under the key `applied`."""
    metadata = metadata or sa.MetaData()
    found = {
        kind: sa.Table(
            entity.table,
            metadata,
            *(
                sa.Column(
                    column.name,
                    _sql_type(column.type, column.length),
                    primary_key=column.key,
                    nullable=not column.required,
                    autoincrement=False,
                )
                for column in entity.columns
            ),
        )
        for kind, entity in mapping.entities.items()
    }
    found["applied"] = sa.Table(
        APPLIED,
        metadata,
        sa.Column("adapter", sa.String(100), primary_key=True),
        sa.Column("doc", sa.String(80), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("applied_at", sa.DateTime, nullable=False),
    )
    return found


def _sql_type(kind: ColumnType, length: int | None) -> sa.types.TypeEngine[Any]:
    match kind:
        case ColumnType.STRING:
            return sa.String(length)
        case ColumnType.INTEGER:
            return sa.BigInteger()
        case ColumnType.NUMBER:
            return sa.Double()
        case ColumnType.BOOLEAN:
            return sa.Boolean()
        case ColumnType.TIMESTAMP:
            return sa.DateTime()


def engine_for(url: URL, application: str) -> Engine:
    """A pooled engine for the target: connections checked before use (a terminated one is
    replaced, not handed out), READ COMMITTED where the dialect has it (no gap locks between
    deliveries of different orders in MariaDB), and on SQLite, transactions that take the write
    lock when they begin, so that reading the applied seq and writing the rows are one step."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _no_driver_transactions(connection: Any, record: Any) -> None:
            connection.isolation_level = None  # transactions as this module begins them
            connection.execute("PRAGMA journal_mode=WAL")

        @sa.event.listens_for(engine, "begin")
        def _immediate(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if backend == "postgresql":
        connect_args["application_name"] = application[:63]
    else:
        connect_args["program_name"] = application[:63]
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=4,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )


class ErpSqlAdapter:
    """One `erp_sql` adapter: delivers work orders to the tables of one database."""

    kind = KIND
    doc_types = frozenset({"wo"})

    def __init__(self, name: str, config: ErpSqlConfig) -> None:
        self.name = name
        self.config = config
        self.max_attempts = config.max_attempts
        self._tables = tables(config.mapping)
        self._engine: Engine | None = None
        self._prepared = False
        self._failures = 0
        self._last_error = ""
        self._counts = {"delivered": 0.0, "unchanged": 0.0, "failed": 0.0, "rows": 0.0}

    async def start(self) -> None:
        self._engine = engine_for(self.config.url, f"fieldsync-{self.name}")
        try:
            await asyncio.to_thread(self._prepare)
        except DeliveryError as error:
            # Not fatal: deliveries wait (retryable) until the database answers.
            self._failures, self._last_error = self._failures + 1, str(error)
            log.warning("erp_sql %s: the database is not ready yet: %s", self.name, error)

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.dispose)

    def health(self) -> Health:
        if self._failures == 0:
            return Health(HealthState.OK)
        state = HealthState.DOWN if not self._prepared else HealthState.DEGRADED
        return Health(state, f"{self._failures} failed in a row; last: {self._last_error}")

    def metrics(self) -> Mapping[str, float]:
        return dict(self._counts)

    async def deliver(self, delivery: Delivery) -> None:
        try:
            written = await asyncio.to_thread(self._deliver, delivery)
        except DeliveryError as error:
            self._counts["failed"] += 1
            if error.retryable:
                self._failures += 1
                self._last_error = str(error)
            raise
        self._failures = 0
        if written is None:
            self._counts["unchanged"] += 1
        else:
            self._counts["delivered"] += 1
            self._counts["rows"] += written

    # --- in a worker thread -----------------------------------------------------------------

    def _prepare(self) -> None:
        engine = self._live_engine()
        wanted = list(self._tables.values())
        if not self.config.create_schema:
            wanted = [self._tables["applied"]]  # the adapter's own record, always
        with _database_errors():
            self._tables["applied"].metadata.create_all(engine, tables=wanted, checkfirst=True)
        self._prepared = True

    def _live_engine(self) -> Engine:
        if self._engine is None:
            raise DeliveryError("adapter_stopped", f"{self.name} is not running")
        return self._engine

    def _deliver(self, delivery: Delivery) -> int | None:
        """Apply `delivery` in one transaction; the rows written, None for a seq not newer
        than the one applied."""
        if not self._prepared:
            self._prepare()
        try:
            projection = self.config.mapping.project(delivery.doc, delivery.seq, delivery.document)
        except ProjectionError as error:
            raise DeliveryError(
                "unprojectable", error.message, retryable=False, entity=error.entity
            ) from None
        applied = self._tables["applied"]
        where = (applied.c.adapter == self.name) & (applied.c.doc == delivery.doc)
        step = f"{APPLIED}({delivery.doc})"
        with _database_errors(lambda: step), self._live_engine().begin() as connection:
            # The record is claimed before the rows are written: an existing one is locked
            # until commit (a racing delivery of the document waits, then sees this seq); a new
            # one is inserted, and a racing insert of the same document fails on its key and is
            # retried. So an older seq never overwrites a newer one's rows.
            done = connection.execute(sa.select(applied.c.seq).where(where).with_for_update())
            last = done.scalar()
            if last is not None and last >= delivery.seq:
                return None
            if last is None:
                record = {"adapter": self.name, "doc": delivery.doc, "seq": delivery.seq}
                connection.execute(sa.insert(applied).values(**record, applied_at=_utcnow()))
            else:
                claim = sa.update(applied).where(where)
                connection.execute(claim.values(seq=delivery.seq, applied_at=_utcnow()))
            written = 0
            for kind, entity in self.config.mapping.entities.items():
                step = f"{entity.table}({delivery.doc})"
                rows = projection[kind]
                written += self._replace(connection, delivery.doc, entity, self._tables[kind], rows)
            return written

    def _replace(
        self, connection: Connection, doc: str, entity: Entity, table: sa.Table, rows: list[Row]
    ) -> int:
        """Make the order's rows of `table` equal `rows`: upsert them, delete the rest (only
        what the document itself no longer holds; a posted row is reversed, never dropped)."""
        if entity.kind != "order":
            stale = table.c[entity.order_column] == doc
            others = [table.c[key] for key in entity.keys if key != entity.order_column]
            if rows:
                kept = [tuple(row[c.name] for c in others) for row in rows]
                if len(others) == 1:
                    stale &= others[0].not_in([k[0] for k in kept])
                else:
                    stale &= sa.not_(sa.tuple_(*others).in_(kept))
            connection.execute(sa.delete(table).where(stale))
        _upsert(connection, table, rows, entity.keys)
        return len(rows)


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def _upsert(
    connection: Connection, table: sa.Table, rows: Sequence[Row], keys: Sequence[str]
) -> None:
    """Insert `rows`, or update the ones whose key is taken, in the dialect's own form."""
    if not rows:
        return
    values = [c.name for c in table.columns if c.name not in keys]
    match connection.dialect.name:
        case "postgresql" | "sqlite":
            dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
            insert = dialect.insert(table)
            if values:
                statement = insert.on_conflict_do_update(
                    index_elements=list(keys), set_={c: insert.excluded[c] for c in values}
                )
            else:
                statement = insert.on_conflict_do_nothing(index_elements=list(keys))
        case "mysql" | "mariadb":
            insert = mysql.insert(table)
            update = values or list(keys)  # nothing else to set: a key onto itself is a no-op
            statement = insert.on_duplicate_key_update({c: insert.inserted[c] for c in update})
        case other:
            raise DeliveryError(
                "unsupported_database", f"{other} is not supported", retryable=False
            )
    connection.execute(statement, list(rows))


@contextmanager
def _database_errors(entity: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """Turns the driver's errors into DeliveryErrors: data the target refuses names the entity
    being written and is not retried; a lost connection, a deadlock, a missing table are."""
    try:
        yield
    except exc.SQLAlchemyError as error:
        where = entity()
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0][:300]
        # A duplicate key on the applied record is a race with another delivery of the same
        # document (retried: it then sees that seq); any other refused value is the data's.
        racing = isinstance(error, exc.IntegrityError) and str(where).startswith(APPLIED)
        if isinstance(error, exc.DataError | exc.IntegrityError) and not racing:
            raise DeliveryError("unprojectable", reason, retryable=False, entity=where) from None
        code = "erp_db_unavailable"
        if racing:
            code = "erp_db_concurrent_delivery"
        elif isinstance(error, exc.ProgrammingError):
            code = "erp_db_schema"
        raise DeliveryError(code, reason, entity=where) from None
