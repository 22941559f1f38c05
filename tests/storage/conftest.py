"""The backends the storage contract runs against. Every test that takes `backend` (or one of
the Protocols it gives: `store`, `screens`, `reference`) runs once per entry of `make_backend`'s
params, so a new backend joins by adding one.

PostgreSQL: the loopback server, in a database this test session creates under a unique name and
drops after; each backend a test makes gets a schema of its own in it (`search_path` in the
URL), so tests never see each other's rows. Without the server the PostgreSQL runs are skipped,
or fail when `FIELDSYNC_REQUIRE_SERVICES=1`."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from fieldsync.storage import (
    Backend,
    PostgresBackend,
    ReferenceStore,
    Screens,
    SQLiteBackend,
    Store,
)

BackendFactory = Callable[..., Backend]

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
_schemas = itertools.count(1)


def postgres_unavailable(error: Exception) -> None:
    message = f"PostgreSQL is not reachable on loopback: {str(error).splitlines()[0]}"
    if os.environ.get("FIELDSYNC_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (FIELDSYNC_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of a database of this session's own, dropped at its end."""
    name = f"fs_storage_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as error:
        postgres_unavailable(error)
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def postgres_schema(database: str, name: str) -> str:
    """A URL of `database` whose tables live in the schema `name` (created when missing)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {name}")
    return f"{database}?options={quote(f'-c search_path={name}')}"


@pytest.fixture(params=["sqlite", "postgres"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """Build an unopened backend; the same `name` reaches the same data, so a test can reopen
    it. Keyword options (compaction thresholds, batch size, import chunk) go to the backend."""
    prefix = f"t{next(_schemas)}"
    database = request.getfixturevalue("postgres_database") if request.param == "postgres" else ""

    def make(name: str = "fieldsync", **options: int) -> Backend:
        match request.param:
            case "sqlite":
                return SQLiteBackend(tmp_path / f"{name}.db", **options)
            case "postgres":
                schema = f"{prefix}_{name}".replace("-", "_")
                return PostgresBackend(postgres_schema(database, schema), **options)
        raise AssertionError(request.param)

    return make


@pytest.fixture
async def backend(make_backend: BackendFactory) -> AsyncIterator[Backend]:
    backend = make_backend()
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


@pytest.fixture
def screens(backend: Backend) -> Screens:
    return backend.screens


@pytest.fixture
def reference(backend: Backend) -> ReferenceStore:
    return backend.reference
