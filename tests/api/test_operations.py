"""Health, readiness and metrics, and what the access log may never contain."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fieldsync.app import STORE, create_app
from fieldsync.auth import DevIssuer
from fieldsync.config import Settings
from fieldsync.records import Origin, OriginKind
from fieldsync.storage import StorageError, Write
from tests.harness import Server, work_order
from tests.wire import connect


async def get(
    server: Server, path: str, token: str | None = None
) -> tuple[int, dict[str, Any], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(server.url + path, headers=headers) as r:
        return r.status, await r.json(content_type=None), r.content_type


async def test_health_and_readiness(server: Server) -> None:
    assert (await get(server, "/v1/health"))[:2] == (200, {"status": "ok"})
    status, body, _ = await get(server, "/v1/ready")
    assert status == 200
    assert body["status"] == "ready"
    assert body["seq"] == 0


@pytest.mark.parametrize(
    ("subject", "status", "code"),
    [(None, 401, "reauthenticate"), ("tina", 403, "forbidden"), ("sam", 403, "forbidden")],
)
async def test_metrics_are_refused_with_a_problem(
    server: Server, subject: str | None, status: int, code: str
) -> None:
    token = server.token(subject) if subject else None
    got, body, content_type = await get(server, "/v1/metrics", token)
    assert (got, body["code"]) == (status, code)
    assert content_type == "application/problem+json"


async def test_metrics_for_admins_count_what_is_stored(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:m1", work_order("wo:m1").get_update())
        await wire.control("ack")
        status, body, _ = await get(server, "/v1/metrics", server.token("ada"))
    assert status == 200
    assert body["store"]["docs"] == 1
    assert body["store"]["updates"] == 1
    assert body["connections"] == 1
    assert body["rooms_loaded"] == 1


async def test_a_token_in_the_query_string_never_reaches_the_log(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    token = server.token("tina")
    caplog.set_level(logging.DEBUG)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.yws_url("wo:nolog") + f"?token={token}") as ws,
    ):
        await ws.close()
    async with aiohttp.ClientSession() as http:
        await http.get(server.url + f"/v1/health?token={token}")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/v1/health" in logged  # the access log ran…
    assert token not in logged  # …without the token
    assert token[-20:] not in logged


async def test_a_server_that_cannot_start_leaves_its_database_closed(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    # An identity provider that is not there: the token verifier cannot start.
    await issuer.stop()
    settings = Settings.load(environ={}, data_dir=str(tmp_path), oidc_issuer=issuer.issuer, port=0)
    app = create_app(settings)
    runner = web.AppRunner(app)
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            await runner.setup()
    finally:
        await runner.cleanup()
    # The backend had opened before the verifier failed, and was closed again.
    with pytest.raises(StorageError):
        app[STORE].append(
            Write("wo:1", work_order("wo:1").get_update(), Origin(OriginKind.RULES), "rules")
        )
