"""Cluster mode on the loopback PostgreSQL and Redis: a database (schema) of each test's own, a
Redis channel of each test's own (the Redis is shared), and the Redis reachable or the test
skipped (failed under FIELDSYNC_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import pytest

from tests.harness import unavailable
from tests.storage.conftest import PostgresSchemas, postgres_schemas

__all__ = ["postgres_schemas"]

REDIS = ("127.0.0.1", 6379)
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def url(postgres_schemas: PostgresSchemas) -> Iterator[str]:
    schema = postgres_schemas.take()
    yield postgres_schemas.url(schema)
    postgres_schemas.give_back(schema)


@pytest.fixture
def channel() -> str:
    try:
        socket.create_connection(REDIS, timeout=2).close()
    except OSError as error:
        unavailable(f"Redis is not reachable on {REDIS}: {error}")
    return f"fieldsync-test:{secrets.token_hex(6)}"
