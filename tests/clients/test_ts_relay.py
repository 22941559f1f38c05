"""`@fieldsync/client` given an update that was relayed to it before it was durable, and whose
commit then failed (the server relays a peer's update before its commit: `Replicator._commit`):
the reset makes it drop the copy that held it, and it ends with the server's document, which
holds the edit once its author's device has sent it again.

The storage fails for real, as in `tests/replication/test_relay.py`: another connection holds
SQLite's write lock past the server writer's busy timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pycrdt import Doc, Text

from fieldsync.auth import DevIssuer
from fieldsync.client import Client
from tests.clients.conftest import TsDevice, TsDeviceFactory
from tests.harness import Server, eventually, stored_doc, work_order, write_lock_held

DOC = "wo:ts-relay-1"


def notes(doc: Doc[Any]) -> str:
    return str(doc.get("notes", type=Text))


async def test_ts_device_drops_a_relayed_update_whose_commit_failed(
    server: Server[DevIssuer], ts_device: TsDeviceFactory, tmp_path: Path
) -> None:
    async with sam_and_ts_tina(server, ts_device, tmp_path, DOC) as (sam, ts):
        with write_lock_held(server):
            sam.doc(DOC).get("notes", type=Text).insert(0, "new seal ordered ")
            await ts_notes_until(ts, DOC, lambda text: "new seal ordered" in text)
            assert sam.pending(DOC) == 1  # relayed to tina's device, not acknowledged
            await eventually(lambda: bool(sam.resets), timeout=60)
            await eventually(lambda: reset(ts, DOC), timeout=30)
        [event] = [e["value"] for e in ts.events if e["event"] == "reset"]
        assert event["reason"].startswith("storage failure")
        assert event["rejected"] == 0
        await eventually(lambda: "new seal ordered" in notes(sam.doc(DOC)))
        await sam.wait_acked(DOC)
        stored = notes(await stored_doc(server, DOC))
        assert stored.count("new seal ordered") == 1
        await ts_notes_until(ts, DOC, lambda text: text == stored)


async def test_ts_device_sends_an_edit_built_on_a_relayed_update_once_that_update_is_stored(
    server: Server[DevIssuer], ts_device: TsDeviceFactory, tmp_path: Path
) -> None:
    """sam's edit reaches tina's device before its commit; tina writes right after it; both
    commits fail, and sam is offline by then, so only tina is reset. Her edit, applied again on
    the server's state, cannot take effect (it builds on sam's): Yjs keeps it aside. Once sam is
    back and his edit is stored, hers is stored too, after it, and acknowledged to tina's device
    without a reconnect."""
    doc_id = "wo:ts-relay-2"
    async with sam_and_ts_tina(server, ts_device, tmp_path, doc_id) as (sam, ts):
        with write_lock_held(server):
            sam.doc(doc_id).get("notes", type=Text).insert(0, "[sam]")
            await ts_notes_until(ts, doc_id, lambda text: "[sam]" in text)
            await sam.go_offline()  # before his commit fails (the writer's busy timeout)
            await ts.edit_doc(doc_id, [{"insert": [1.0, "[tina]"]}])  # after sam's
            # On a loaded machine sam's commit can fail (the writer's busy timeout) before
            # tina's edit is made: hers then builds on nothing missing, and is simply stored.
            built_on_sam = (await ts.dump_doc(doc_id))["json"]["notes"] == "[sam][tina]"
            await eventually(lambda: reset(ts, doc_id), timeout=60)
        await sam.start()
        await sam.wait_acked(doc_id)
        await ts.wait_acked(timeout=30)
        stored = notes(await stored_doc(server, doc_id))
        assert sorted([stored.count("[sam]"), stored.count("[tina]")]) == [1, 1]
        if built_on_sam:
            assert stored == "[sam][tina]"


@asynccontextmanager
async def sam_and_ts_tina(
    server: Server[DevIssuer], ts_device: TsDeviceFactory, tmp_path: Path, doc_id: str
) -> AsyncIterator[tuple[Client, TsDevice]]:
    """sam's Python device, which creates `doc_id` for tina, and tina's TypeScript one, synced."""
    sam = server.client("sam")
    ts = await ts_device(server, "tina", tmp_path / "tina.json")
    try:
        await sam.start()
        sam.doc(doc_id).apply_update(work_order(doc_id, assignee="tina").get_update())
        await sam.wait_acked(doc_id)
        await ts.start()
        await ts.wait_synced(doc_id)
        yield sam, ts
    finally:
        await sam.close()


async def ts_notes_until(ts: TsDevice, doc_id: str, wanted: Callable[[str], bool]) -> None:
    async with asyncio.timeout(30):
        while True:
            if wanted(str((await ts.dump_doc(doc_id))["json"]["notes"])):
                return
            await asyncio.sleep(0.02)


def reset(ts: TsDevice, doc_id: str) -> bool:
    return any(e["event"] == "reset" and e["value"]["doc"] == doc_id for e in ts.events)
