"""The databases `erp_sql` is tested against: SQLite in a temporary file, and a uniquely named
database on the loopback PostgreSQL and MariaDB, dropped afterwards. Without a server the test
is skipped, or fails when `FIELDSYNC_REQUIRE_SERVICES=1`."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from tests.harness import unavailable

SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mariadb+pymysql://root@127.0.0.1:3306/",
}
DIALECTS = ("sqlite", "postgresql", "mariadb")


@dataclass
class Target:
    dialect: str
    url: URL
    database: str

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(self.url, poolclass=sa.NullPool)

    def kill_connections(self) -> int:
        """Terminate every other session on the target's database: how many there were."""
        with sa.create_engine(_server(self.dialect), poolclass=sa.NullPool).connect() as admin:
            if self.dialect == "postgresql":
                return len(
                    admin.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": self.database},
                    ).all()
                )
            ids = admin.execute(
                sa.text(
                    "SELECT id FROM information_schema.processlist"
                    " WHERE db = :db AND id <> CONNECTION_ID()"
                ),
                {"db": self.database},
            ).scalars()
            killed = 0
            for ident in ids:
                try:
                    admin.exec_driver_sql(f"KILL {int(ident)}")
                    killed += 1
                except sa.exc.OperationalError:  # it ended meanwhile
                    pass
            return killed


def _server(dialect: str) -> URL:
    return make_url(SERVERS[dialect])


def _unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable on loopback: {str(error).splitlines()[0]}"
    unavailable(message)


@contextmanager
def target(dialect: str, tmp_path: Path) -> Iterator[Target]:
    if dialect == "sqlite":
        path = tmp_path / "erp.sqlite"
        found = Target(dialect, make_url(f"sqlite+pysqlite:///{path}"), str(path))
        yield found
        found.engine.dispose()
        return
    name = f"fs_erp_{secrets.token_hex(6)}"
    admin = sa.create_engine(_server(dialect), poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as error:
        _unavailable(dialect, error)
    found = Target(dialect, _server(dialect).set(database=name), name)
    try:
        yield found
    finally:
        found.engine.dispose()
        with admin.connect() as connection:
            force = " WITH (FORCE)" if dialect == "postgresql" else ""
            connection.exec_driver_sql(f"DROP DATABASE {name}{force}")
        admin.dispose()


def rows(connection: sa.Connection, table: sa.Table, order_id: str) -> list[dict[str, Any]]:
    """The rows of `table` for one order, as plain dicts in key order."""
    result = connection.execute(sa.select(table).where(table.c.order_id == order_id))
    return sorted((dict(row._mapping) for row in result), key=row_key)


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(k)) for k in ("order_id", "op_id", "entry_id", "line_id", "reversal"))
