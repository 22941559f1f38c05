from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fieldsync.adapters import AdapterContext
from fieldsync.storage import ReferenceData, SQLiteOutbox, SQLiteStore


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
    return AdapterContext(tmp_path, SQLiteOutbox(sqlite_store), ReferenceData(sqlite_store))
