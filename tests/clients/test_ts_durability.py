"""`@fieldsync/client` loses nothing when the server dies: a device coming back with offline
edits on 100 work orders is syncing when the server is killed (SIGKILL, no shutdown), edits more
while it is down, and once the server is back every edit is stored once and acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from pycrdt import Map, Text

from fieldsync.auth import DevIssuer
from fieldsync.client import Client
from tests.clients.conftest import TsDeviceFactory
from tests.harness import Server, free_port, work_order

pytestmark = pytest.mark.slow

COUNT = 100


class ServerProcess:
    """`fieldsync serve` in its own process, on one port across restarts, so that it can be
    killed as a power cut or the OOM killer would (SIGKILL: no shutdown, nothing flushed)."""

    def __init__(self, issuer: DevIssuer, data_dir: Path) -> None:
        self.issuer = issuer
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "FIELDSYNC_HOST": "127.0.0.1",
            "FIELDSYNC_PORT": str(self.port),
            "FIELDSYNC_DATA_DIR": str(self.data_dir),
            "FIELDSYNC_OIDC_ISSUER": self.issuer.issuer,
            "FIELDSYNC_LOG_LEVEL": "WARNING",
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fieldsync", "serve", env=env
        )
        # Ready once it answers; a server that died at start fails here, not later.
        async with asyncio.timeout(30), aiohttp.ClientSession() as http:
            while True:
                assert self.process.returncode is None, "the server exited at start"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/v1/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    def as_server(self) -> Server[DevIssuer]:
        """What the TS device and `Client` need of it (its URLs and the issuer)."""
        return Server(self.url, None, self.issuer, self.data_dir)  # type: ignore[arg-type]


@pytest.fixture
async def server_process(issuer: DevIssuer, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(issuer, tmp_path / "data")
    await server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.returncode is None:
            await server.kill()


async def test_server_killed_mid_sync_loses_nothing(
    server_process: ServerProcess, ts_device: TsDeviceFactory, tmp_path: Path
) -> None:
    server = server_process.as_server()
    ids = [f"wo:kill-{i}" for i in range(COUNT)]
    sam = Client(server.sync_url, server.token("sam"))
    await sam.start()
    for doc_id in ids:
        sam.doc(doc_id).apply_update(work_order(doc_id, assignee="tina").get_update())
    await sam.wait_acked(timeout=60)
    await sam.close()

    tina = await ts_device(server, "tina", tmp_path / "tina.json")
    await tina.start()
    await tina.wait_caught_up()
    await tina.stop()
    for i, doc_id in enumerate(ids):
        await tina.edit_doc(doc_id, [{"insert": [0.0, f"offline-{i} "]}, {"meter": 100 + i}])
    assert (await tina.state())["pending"] == 2 * COUNT

    # Back online; the server dies while the device's offer is being answered.
    after = len(tina.events)
    await tina.start()
    await tina.wait_event(lambda e: e.get("value") == "connected", after=after)
    await server_process.kill()
    # Killed mid-sync: the welcome had come, acknowledgements of the offline edits had not
    # all (the device offers 100 documents in one BATCH; the server answers it whole).
    assert (await tina.state())["pending"] > 0
    await tina.edit_doc(ids[0], [{"insert": [1.0, " during-outage"]}])

    await server_process.start()
    await tina.wait_acked(timeout=60)
    state = await tina.state()
    assert state["pending"] == 0
    assert state["sockets"] >= 2, "the device reconnected"

    # What the server holds, as a fresh device downloads it: every edit, each exactly once.
    check = Client(server.sync_url, server.token("sam"))
    await check.start()
    try:
        for i, doc_id in enumerate(ids):
            await check.wait_synced(doc_id)
            doc = check.doc(doc_id)
            notes = str(doc.get("notes", type=Text))
            assert notes.count(f"offline-{i} ") == 1, (doc_id, notes)
            assert doc.get("fields", type=Map)["meter_reading"] == 100 + i
        assert str(check.doc(ids[0]).get("notes", type=Text)).endswith(" during-outage")
    finally:
        await check.close()
