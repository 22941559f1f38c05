"""`@fieldsync/client` (clients/ts) against a running server: the Node tests of the package
(`clients/ts/test/*.test.mjs`, node's own test runner on the compiled JavaScript), each file
with a fresh server and development issuer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldsync.auth import DevIssuer
from tests.clients.conftest import node_env, run_node_tests
from tests.harness import Server


@pytest.mark.parametrize(
    "test_file",
    [
        "codec.test.mjs",
        "storage.test.mjs",
        "many_documents.test.mjs",
        "offline_restart.test.mjs",
        "scope.test.mjs",
        "refused_edit.test.mjs",
        "token_renewal.test.mjs",
        "awareness.test.mjs",
    ],
)
async def test_node(ts_client: Path, server: Server[DevIssuer], test_file: str) -> None:
    await run_node_tests(ts_client, test_file, node_env(server), timeout=60)
