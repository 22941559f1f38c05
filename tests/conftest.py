from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fieldsync.auth import DevIssuer
from tests.harness import Server, running_issuer, running_server


@pytest.fixture
async def issuer() -> AsyncIterator[DevIssuer]:
    async with running_issuer() as issuer:
        yield issuer


@pytest.fixture
async def server(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data", issuer) as server:
        yield server
