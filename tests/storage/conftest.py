"""The backends the storage contract runs against. Every test that takes `backend` (or one of
the Protocols it gives: `store`, `screens`, `reference`) runs once per entry of `make_backend`'s
params, so a new backend joins by adding one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fieldsync.storage import Backend, ReferenceStore, Screens, SQLiteBackend, Store

BackendFactory = Callable[..., Backend]


@pytest.fixture(params=["sqlite"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """Build an unopened backend; the same `name` reaches the same data, so a test can reopen
    it. Keyword options (compaction thresholds, batch size, import chunk) go to the backend."""

    def make(name: str = "fieldsync", **options: int) -> Backend:
        match request.param:
            case "sqlite":
                return SQLiteBackend(tmp_path / f"{name}.db", **options)
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
