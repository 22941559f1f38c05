"""The backends the storage contract runs against. Every test that takes `backend` (or one of
the Protocols it gives: `store`, `screens`, `reference`) runs once per entry of `make_backend`'s
params, so a new backend joins by adding one.

PostgreSQL: the loopback server, in a database this test session creates under a unique name and
drops at its end. Each backend a test makes lives in a schema of its own (`search_path` in its
URL), so tests never see each other's rows; a finished test's schemas are emptied and handed to
later tests, since creating the tables costs far more than emptying them. Without the server the
PostgreSQL runs are skipped, or fail when `FIELDSYNC_REQUIRE_SERVICES=1`."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
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
from fieldsync.storage._postgres_migrations import MIGRATIONS
from tests.harness import unavailable

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
# Left alone when a schema is emptied: what migrations wrote once (the cursor key is one).
_KEPT = ("schema_migrations", "meta", "change_seq")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A property test on PostgreSQL takes a schema per example: tens of seconds, so slow."""
    here = Path(__file__).parent
    for item in items:
        test = getattr(item, "obj", None)
        if (
            item.path.is_relative_to(here)
            and "[postgres" in item.nodeid
            and getattr(test, "is_hypothesis_test", False)
        ):
            item.add_marker(pytest.mark.slow)


def postgres_unavailable(error: Exception) -> None:
    message = f"PostgreSQL is not reachable on loopback: {str(error).splitlines()[0]}"
    unavailable(message)


class PostgresSchemas:
    """This session's database, and its schemas: each new one, or an emptied one given back."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._free: list[str] = []
        self._names = itertools.count(1)

    def url(self, schema: str) -> str:
        return f"{self.database}?options={quote(f'-c search_path={schema}')}"

    def take(self) -> str:
        with psycopg.connect(self.database, autocommit=True) as conn:
            if not self._free:
                schema = f"s{next(self._names)}"
                conn.execute(f"CREATE SCHEMA {schema}")
                return schema
            schema = self._free.pop()
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND NOT tablename = ANY(%s)",
                (schema, list(_KEPT)),
            ).fetchall()
            sequences = conn.execute(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = %s", (schema,)
            ).fetchall()
            with conn.transaction():
                for (table,) in tables:
                    conn.execute(f"DELETE FROM {schema}.{table}")
                for (sequence,) in sequences:
                    conn.execute("SELECT setval(%s, 1, false)", (f"{schema}.{sequence}",))
                if tables:
                    conn.execute(f"UPDATE {schema}.change_seq SET value = 0")
                    # What a test recorded to look like a newer fieldsync's database.
                    conn.execute(
                        f"DELETE FROM {schema}.schema_migrations WHERE NOT version = ANY(%s)",
                        ([m.version for m in MIGRATIONS],),
                    )
            return schema

    def give_back(self, schema: str) -> None:
        self._free.append(schema)


@pytest.fixture(scope="session")
def postgres_schemas() -> Iterator[PostgresSchemas]:
    name = f"fs_storage_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as error:
        postgres_unavailable(error)
    try:
        yield PostgresSchemas(f"{POSTGRES_SERVER}/{name}")
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


class BackendFactory:
    """`make(name, **options)`: an unopened backend; the same `name` reaches the same data
    within a test, so a test can reopen it. Keyword options (compaction thresholds, batch size,
    import chunk) go to the backend. `fresh(**options)`: an opened backend on data of its own,
    for one example of a property test."""

    def __init__(self, kind: str, tmp_path: Path, schemas: PostgresSchemas | None) -> None:
        self.kind = kind
        self._tmp_path = tmp_path
        self._schemas = schemas
        self._named: dict[str, str] = {}
        self._fresh = itertools.count(1)

    def __call__(self, name: str = "fieldsync", **options: Any) -> Backend:
        if self._schemas is None:
            return SQLiteBackend(self._tmp_path / f"{name}.db", **options)
        if name not in self._named:
            self._named[name] = self._schemas.take()
        return PostgresBackend(self._schemas.url(self._named[name]), **options)

    @asynccontextmanager
    async def fresh(self, **options: Any) -> AsyncIterator[Backend]:
        schema = None
        if self._schemas is None:
            backend: Backend = SQLiteBackend(
                self._tmp_path / f"fresh-{next(self._fresh)}.db", **options
            )
        else:
            schema = self._schemas.take()
            backend = PostgresBackend(self._schemas.url(schema), **options)
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()
            if schema is not None and self._schemas is not None:
                self._schemas.give_back(schema)

    def release(self) -> None:
        if self._schemas is not None:
            for schema in self._named.values():
                self._schemas.give_back(schema)
        self._named.clear()


@pytest.fixture(params=["sqlite", "postgres"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    schemas = request.getfixturevalue("postgres_schemas") if request.param == "postgres" else None
    factory = BackendFactory(request.param, tmp_path, schemas)
    yield factory
    factory.release()


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
