"""The foreign databases the inbound SQL adapters read in tests: a uniquely named database on
the loopback PostgreSQL (an ERP) or MariaDB (a legacy asset register), dropped afterwards.
Without the server the test is skipped, or fails when `FIELDSYNC_REQUIRE_SERVICES=1`."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from tests.harness import unavailable

SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mariadb+pymysql://root@127.0.0.1:3306/",
}


@contextmanager
def foreign_database(dialect: str) -> Iterator[str]:
    """The URL of a new, empty database on the loopback `dialect` server."""
    server = sa.engine.make_url(SERVERS[dialect])
    name = f"fs_inbound_{secrets.token_hex(6)}"
    admin = sa.create_engine(server, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as error:
        message = f"{dialect} is not reachable on loopback: {str(error).splitlines()[0]}"
        unavailable(message)
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            force = " WITH (FORCE)" if dialect == "postgresql" else ""
            connection.exec_driver_sql(f"DROP DATABASE {name}{force}")
        admin.dispose()
