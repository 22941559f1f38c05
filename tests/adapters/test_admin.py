"""Operators and the outbox of a running server: its adapters started with it, dead letters
listed over REST (admins only, paginated, problem+json errors) and retried or skipped there or
with `fieldsync outbox`, health in `/v1/ready` and figures in `/v1/metrics`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fieldsync.adapters import DeliveryError
from fieldsync.app import ADAPTERS
from fieldsync.auth import DevIssuer
from fieldsync.cli import main
from fieldsync.records import Origin, OriginKind
from fieldsync.storage import OutboxError, Write
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.recorder import KIND, Recorder
from tests.harness import Server, running_server, work_order

REFUSED = DeliveryError("rejected_by_erp", "cost centre K-17 is closed", entity="order/4711")


@pytest.fixture
async def server(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    """A server with one outbound adapter, `erp` (the recording test target), that gives up
    after the first failure."""
    path = tmp_path / "adapters.toml"
    path.write_text(f'[adapters.erp]\nkind = "{KIND}"\nmax_attempts = 1\n')
    async with running_server(tmp_path / "data", issuer, adapters=str(path)) as server:
        yield server


def recorder(server: Server) -> Recorder:
    (erp,) = server.app[ADAPTERS].adapters
    assert isinstance(erp, Recorder)
    return erp


async def call(
    server: Server, method: str, path: str, subject: str | None = "ada"
) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {server.token(subject)}"} if subject else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, server.url + path, headers=headers) as response,
    ):
        return response.status, response.content_type, await response.json(content_type=None)


async def create(server: Server, number: str) -> None:
    body = {"id": f"wo:{number}", "fields": {"number": number, "title": "T", "assignee": "tina"}}
    headers = {"Authorization": f"Bearer {server.token('sam')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/work-orders", json=body, headers=headers) as r,
    ):
        assert r.status == 201


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until `check()` holds: the outbox's state, read back (it has no event of its own
    outside the server's process)."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - read back over HTTP, no event here
            await asyncio.sleep(0.02)


async def dead_letters(server: Server) -> list[dict[str, Any]]:
    status, _, body = await call(server, "GET", "/v1/admin/outbox?state=dead")
    assert status == 200
    return list(body["items"])


async def test_a_dead_letter_is_listed_with_its_error_then_retried_once_fixed(
    server: Server,
) -> None:
    erp = recorder(server)
    erp.poison["wo:bad"] = REFUSED
    await create(server, "bad")
    await create(server, "good")

    async def one_dead() -> bool:
        return len(await dead_letters(server)) == 1

    await until(one_dead)
    (dead,) = await dead_letters(server)
    assert (dead["adapter"], dead["doc"], dead["state"], dead["attempts"]) == (
        "erp",
        "wo:bad",
        "dead",
        1,
    )
    assert dead["error"] == {
        "code": "rejected_by_erp",
        "message": "cost centre K-17 is closed",
        "entity": "order/4711",
    }
    assert dead["seq"] > 0
    assert dead["created_at"] <= dead["updated_at"]
    # The others flow.
    await until(lambda: _true("wo:good" in erp.applied))
    status, _, ready = await call(server, "GET", "/v1/ready", None)
    assert status == 200
    assert ready["adapters"]["erp"]["state"] == "degraded"
    status, _, metrics = await call(server, "GET", "/v1/metrics")
    assert metrics["adapters"]["erp"]["outbox"]["dead"] == 1
    # Fixed at the ERP; the operator retries and the document goes at once.
    del erp.poison["wo:bad"]
    status, _, retried = await call(server, "POST", f"/v1/admin/outbox/{dead['id']}/retry")
    assert status == 200
    assert (retried["state"], retried["attempts"]) == ("pending", 0)
    await until(lambda: _true("wo:bad" in erp.applied))
    assert await dead_letters(server) == []


async def _true(value: bool) -> bool:
    return value


async def test_skip_and_the_errors_operators_get(server: Server) -> None:
    erp = recorder(server)
    erp.poison["wo:bad"] = REFUSED
    await create(server, "bad")

    async def one_dead() -> bool:
        return len(await dead_letters(server)) == 1

    await until(one_dead)
    (dead,) = await dead_letters(server)
    status, _, skipped = await call(server, "POST", f"/v1/admin/outbox/{dead['id']}/skip")
    assert status == 200
    assert skipped["state"] == "skipped"
    assert await dead_letters(server) == []
    for path, subject, code, expected in [
        ("/v1/admin/outbox/99999/retry", "ada", 404, "not_found"),
        ("/v1/admin/outbox/x1/skip", "ada", 404, "not_found"),
        (f"/v1/admin/outbox/{dead['id']}/retry", "sam", 403, "forbidden"),
        (f"/v1/admin/outbox/{dead['id']}/retry", None, 401, "reauthenticate"),
    ]:
        status, media, problem = await call(server, "POST", path, subject)
        assert (status, media, problem["code"]) == (code, "application/problem+json", expected)
    for query, subject, code, expected in [
        ("?state=lost", "ada", 400, "invalid_request"),
        ("?limit=0", "ada", 400, "invalid_request"),
        ("?cursor=forged", "ada", 400, "invalid_cursor"),
        ("", "mia", 403, "forbidden"),
        ("", None, 401, "reauthenticate"),
    ]:
        status, media, problem = await call(server, "GET", "/v1/admin/outbox" + query, subject)
        assert (status, media, problem["code"]) == (code, "application/problem+json", expected)


async def test_the_list_pages_cover_every_entry_once(server: Server) -> None:
    for n in range(5):
        await create(server, f"p{n}")
    seen: list[int] = []
    path = "/v1/admin/outbox?adapter=erp&limit=2"
    cursor: str | None = None
    while True:
        status, _, page = await call(server, "GET", path + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
        # A cursor is for its own list: another filter refuses it.
        status, _, problem = await call(server, "GET", f"/v1/admin/outbox?cursor={cursor}")
        assert (status, problem["code"]) == (400, "invalid_cursor")
    assert len(seen) == 5
    assert seen == sorted(seen)
    status, _, by_doc = await call(server, "GET", "/v1/admin/outbox?doc=wo:p3")
    assert [item["doc"] for item in by_doc["items"]] == ["wo:p3"]


# --- the CLI, on the database directly ---------------------------------------------------------


async def prepare(data: Path) -> dict[str, int]:
    """Three work orders, each with an `erp` entry: wo:1 delivered, wo:2 dead, wo:3 pending."""
    store = SQLiteStore(data / "fieldsync.db")
    await store.open()
    try:
        outbox = SQLiteOutbox(store)
        outbox.route({"wo": ["erp"]})
        seqs = {}
        for n in (1, 2, 3):
            doc = work_order(f"wo:{n}")
            committed = await store.append(
                Write(f"wo:{n}", doc.get_update(), Origin(OriginKind.REST), "sam")
            )
            seqs[f"wo:{n}"] = committed.seq
        await outbox.delivered("erp", "wo:1", seqs["wo:1"], 1.0)
        error = OutboxError("rejected_by_erp", "closed", "order/4711")
        await outbox.dead_letter("erp", "wo:2", seqs["wo:2"], error, 1.0)
        return seqs
    finally:
        await store.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["outbox", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_lists_retries_skips_and_replays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seqs = asyncio.run(prepare(tmp_path))
    data = ("--data-dir", str(tmp_path))
    code, out, _ = run(capsys, *data, "list", "--json")
    entries = json.loads(out)
    assert code == 0
    assert [(e["doc"], e["state"]) for e in entries] == [
        ("wo:1", "delivered"),
        ("wo:2", "dead"),
        ("wo:3", "pending"),
    ]
    dead = entries[1]
    code, out, _ = run(capsys, *data, "list", "--state", "dead")
    assert code == 0
    (line,) = out.splitlines()
    assert "wo:2" in line
    assert "rejected_by_erp" in line
    assert "order/4711" in line
    code, out, _ = run(capsys, *data, "retry", str(dead["id"]))
    assert code == 0
    assert "pending" in out
    code, out, _ = run(capsys, *data, "list", "--state", "dead", "--json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, *data, "skip", str(entries[2]["id"]))
    assert code == 0
    assert "skipped" in out
    code, out, _ = run(capsys, *data, "replay", "--adapter", "erp", "--from-seq", str(seqs["wo:2"]))
    assert code == 0
    assert out.startswith("2 entries")
    code, out, _ = run(capsys, *data, "list", "--state", "pending", "--json")
    assert [e["doc"] for e in json.loads(out)] == ["wo:2", "wo:3"]
    code, _, err = run(capsys, *data, "retry", "99999")
    assert code == 1
    assert "no outbox entry 99999" in err
    code, _, err = run(capsys, "--data-dir", str(tmp_path / "none"), "list")
    assert code == 2
    assert "no database" in err


@pytest.mark.slow  # the server's runner sees another process's retry at its next poll (5 s)
async def test_the_cli_acts_beside_a_running_server(server: Server) -> None:
    erp = recorder(server)
    erp.poison["wo:bad"] = REFUSED
    await create(server, "bad")

    async def one_dead() -> bool:
        return len(await dead_letters(server)) == 1

    await until(one_dead)
    (dead,) = await dead_letters(server)
    del erp.poison["wo:bad"]
    code = await asyncio.to_thread(
        main, ["outbox", "--data-dir", str(server.data_dir), "retry", str(dead["id"])]
    )
    assert code == 0
    await until(lambda: _true("wo:bad" in erp.applied), timeout=15)
