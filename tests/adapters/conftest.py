from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fieldsync.adapters import AdapterContext
from fieldsync.storage import SQLiteBackend
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore


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


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    """Every storage concern on one SQLite file, opened (for kinds that need the write path)."""
    backend = SQLiteBackend(tmp_path / "backend.db")
    await backend.open()
    yield backend
    await backend.close()
