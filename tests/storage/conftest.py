"""The backends the storage contract runs against: each test of `test_store_contract.py` runs
once per entry of `make_store`'s params, so a new backend joins by adding one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fieldsync.storage import SQLiteStore, Store

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Build an unopened store; the same `name` reaches the same data, so a test can reopen it.
    Keyword options (compaction thresholds, batch size) go to the backend."""

    def make(name: str = "fieldsync", **options: int) -> Store:
        match request.param:
            case "sqlite":
                return SQLiteStore(tmp_path / f"{name}.db", **options)
        raise AssertionError(request.param)

    return make


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    store = make_store()
    await store.open()
    yield store
    await store.close()
