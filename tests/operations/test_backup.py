"""`fieldsync backup` while devices write, `fieldsync restore` into a stopped server's folder:
every document of the backup comes back with its attachments, and the devices, ahead of the
restored server, send it back what it lost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pycrdt import Map

from fieldsync.app import STORE
from fieldsync.auth import DevIssuer
from fieldsync.client import Client
from tests.api.test_uploads import Tus
from tests.harness import Server, png, running_server, stored_doc, work_order
from tests.operations.cli import fieldsync

pytestmark = pytest.mark.slow

DEVICES = 3


async def edit_until(client: Client, doc_id: str, done: Awaitable[Any], first: int) -> int:
    """Edits acknowledged one after another until `done` is; returns the next key number."""
    n = first
    task = asyncio.ensure_future(done)
    while not task.done():
        client.doc(doc_id).get("fields", type=Map)[f"k{n}"] = n
        await client.wait_acked(doc_id)
        n += 1
    await task
    return n


async def fields(server: Server, doc_id: str) -> dict[str, Any]:
    return dict((await stored_doc(server, doc_id)).get("fields", type=Map).to_py() or {})


async def test_a_backup_taken_under_load_restores_every_document(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    live, restored, backup = tmp_path / "live", tmp_path / "restored", tmp_path / "backup"
    docs = [f"wo:bk{i}" for i in range(DEVICES)]
    photo = png()
    expected: dict[str, dict[str, Any]] = {}
    async with running_server(live, issuer) as server, aiohttp.ClientSession() as http:
        devices = [
            server.client("sam", path=tmp_path / f"device-{i}.db", device_id=f"device-{i}")
            for i in range(DEVICES)
        ]
        for device, doc_id in zip(devices, docs, strict=True):
            await device.start()
            device.doc(doc_id).apply_update(work_order(doc_id).get_update())
            await device.wait_acked(doc_id)
        await Tus(server, http, "sam").upload(photo, docs[0])
        # The backup runs while every device writes; then they write more, which the backup
        # cannot hold.
        taken = asyncio.ensure_future(fieldsync(live, "backup", str(backup), "--json"))
        async with asyncio.TaskGroup() as group:
            nexts = [
                group.create_task(edit_until(device, doc_id, asyncio.shield(taken), 0))
                for device, doc_id in zip(devices, docs, strict=True)
            ]
        code, out, err = await taken
        assert code == 0, err
        manifest = orjson.loads(out)
        assert manifest["docs"] == DEVICES
        assert manifest["attachments"] == 1
        for device, doc_id, task in zip(devices, docs, nexts, strict=True):
            first = task.result()
            for n in range(first, first + 5):
                device.doc(doc_id).get("fields", type=Map)[f"k{n}"] = n
            await device.wait_acked(doc_id)
            expected[doc_id] = await fields(server, doc_id)
        for i, device in enumerate(devices):
            await device.close()
            # Reconnected once more: its `since` is now past what the backup holds.
            again = server.client("sam", path=tmp_path / f"device-{i}.db", device_id=f"device-{i}")
            await again.start()
            async with asyncio.timeout(10):
                await again.caught_up.wait()
            assert again.since > manifest["seq"]
            await again.close()

    code, _, err = await fieldsync(restored, "restore", str(backup))
    assert code == 0, err
    code, _, err = await fieldsync(restored, "restore", str(backup))
    assert code == 2
    assert "--force" in err
    assert (await fieldsync(restored, "restore", str(backup), "--force"))[0] == 0

    async with running_server(restored, issuer) as server, aiohttp.ClientSession() as http:
        # Every document of the backup is there, whole up to the moment of the backup.
        for doc_id in docs:
            held = await fields(server, doc_id)
            assert held["number"] == expected[doc_id]["number"]
            assert held.items() <= expected[doc_id].items()
            assert len(held) < len(expected[doc_id]), "the backup should predate the last edits"
        status, _, content = await Tus(server, http, "sam").get(
            f"/v1/attachments/{hashlib.sha256(photo).hexdigest()}"
        )
        assert (status, content) == (200, photo)
        # The devices come back ahead of the restored server: they catch up from seq 0 and
        # send what it lost.
        devices = [
            server.client("sam", path=tmp_path / f"device-{i}.db", device_id=f"device-{i}")
            for i in range(DEVICES)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for device in devices:
                await device.start()
                stack.push_async_callback(device.close)
            for device in devices:
                async with asyncio.timeout(10):
                    await device.caught_up.wait()
            async with asyncio.timeout(10):
                for doc_id in docs:
                    while await fields(server, doc_id) != expected[doc_id]:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)  # the store has no event to wait on
            head = await server.app[STORE].head()
            assert all(device.since <= head for device in devices)
