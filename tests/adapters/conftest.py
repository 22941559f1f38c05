from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fieldsync.adapters import AdapterContext
from fieldsync.storage import SQLiteBackend
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.slapd import Slapd, SmallDirectory, base_entries, big_directory


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "fieldsync.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def adapter_context(tmp_path: Path, sqlite_store: SQLiteStore) -> AdapterContext:
    """What a kind's factory gets, over a real store (no `writer`: inbound kinds override
    this fixture with one)."""
    return AdapterContext(tmp_path, SQLiteOutbox(sqlite_store), SQLiteReference(sqlite_store))


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One slapd for the session, seeded with `big_directory()` under `ou=big`; tests that
    change the directory do it in an `ou` of their own."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.load(base_entries() + "\n" + big_directory())
    server.start()
    try:
        server.ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_small(slapd: Slapd) -> Iterator[Callable[..., SmallDirectory]]:
    """Makes `SmallDirectory`s, their connections closed after the test."""
    made: list[SmallDirectory] = []

    def make(*args: Any, **kwargs: Any) -> SmallDirectory:
        made.append(SmallDirectory(slapd, *args, **kwargs))
        return made[-1]

    yield make
    for directory in made:
        directory.conn.unbind()


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    """Every storage concern on one SQLite file, opened (for kinds that need the write path)."""
    backend = SQLiteBackend(tmp_path / "backend.db")
    await backend.open()
    yield backend
    await backend.close()
