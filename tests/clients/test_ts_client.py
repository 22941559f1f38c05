"""`@fieldsync/client` (clients/ts) against a running server: the Node tests of the package
(`clients/ts/test/*.test.mjs`, node's own test runner on the compiled JavaScript), each file
with a fresh server and development issuer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldsync.auth import DevIssuer
from tests.clients.conftest import node_env, run_node_tests
from tests.harness import Server, running_server

AWAY = 1  # seconds of absence that break the offline contract in `offline_too_long.test.mjs`


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
        "token_request.test.mjs",
        "views.test.mjs",
    ],
)
async def test_node(ts_client: Path, server: Server[DevIssuer], test_file: str) -> None:
    await run_node_tests(ts_client, test_file, node_env(server), timeout=60)


async def test_node_offline_too_long(ts_client: Path, issuer: DevIssuer, tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", issuer, max_offline_days=AWAY / 86_400) as server:
        env = {**node_env(server), "FIELDSYNC_MAX_OFFLINE_SECONDS": str(AWAY)}
        await run_node_tests(ts_client, "offline_too_long.test.mjs", env, timeout=60)


async def test_node_many_documents_in_pages(
    ts_client: Path, issuer: DevIssuer, tmp_path: Path
) -> None:
    """The catch-up of 60 work orders in `changes` pages of 7: `since` moves past the last."""
    async with running_server(tmp_path / "data", issuer, changes_page=7) as server:
        await run_node_tests(ts_client, "many_documents.test.mjs", node_env(server), timeout=60)
