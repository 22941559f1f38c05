"""`@fieldsync/client` given an update that was relayed to it before it was durable, and whose
commit then failed (the server relays a peer's update before its commit: `Replicator._commit`):
the reset makes it drop the copy that held it, and it ends with the server's document, which
holds the edit once its author's device has sent it again.

The storage fails for real, as in `tests/replication/test_relay.py`: another connection holds
SQLite's write lock past the server writer's busy timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pycrdt import Doc, Text

from fieldsync.auth import DevIssuer
from tests.clients.conftest import TsDeviceFactory
from tests.harness import Server, eventually, stored_doc, work_order, write_lock_held

DOC = "wo:ts-relay-1"


def notes(doc: Doc[Any]) -> str:
    return str(doc.get("notes", type=Text))


async def test_ts_device_drops_a_relayed_update_whose_commit_failed(
    server: Server[DevIssuer], ts_device: TsDeviceFactory, tmp_path: Path
) -> None:
    sam = server.client("sam")
    ts = await ts_device(server, "tina", tmp_path / "tina.json")
    try:
        await sam.start()
        sam.doc(DOC).apply_update(work_order(DOC, assignee="tina").get_update())
        await sam.wait_acked(DOC)
        await ts.start()
        await ts.wait_synced(DOC)

        async def ts_notes() -> str:
            return str((await ts.dump_doc(DOC))["json"]["notes"])

        with write_lock_held(server):
            sam.doc(DOC).get("notes", type=Text).insert(0, "new seal ordered ")
            async with asyncio.timeout(30):
                while True:
                    if "new seal ordered" in await ts_notes():
                        break
                    await asyncio.sleep(0.02)
            assert sam.pending(DOC) == 1  # relayed to tina's device, not acknowledged
            await eventually(lambda: bool(sam.resets), timeout=60)

            def reset() -> bool:
                return any(e["event"] == "reset" and e["value"]["doc"] == DOC for e in ts.events)

            await eventually(reset, timeout=30)
        [event] = [e["value"] for e in ts.events if e["event"] == "reset"]
        assert event["reason"].startswith("storage failure")
        assert event["rejected"] == 0
        await eventually(lambda: "new seal ordered" in notes(sam.doc(DOC)))
        await sam.wait_acked(DOC)
        stored = notes(await stored_doc(server, DOC))
        assert stored.count("new seal ordered") == 1
        async with asyncio.timeout(30):
            while True:
                if await ts_notes() == stored:
                    break
                await asyncio.sleep(0.02)
    finally:
        await sam.close()


async def test_ts_device_sends_an_edit_built_on_a_relayed_update_once_that_update_is_stored(
    server: Server[DevIssuer], ts_device: TsDeviceFactory, tmp_path: Path
) -> None:
    """sam's edit reaches tina's device before its commit; tina writes right after it; both
    commits fail, and sam is offline by then, so only tina is reset. Her edit, applied again on
    the server's state, cannot take effect (it builds on sam's): Yjs keeps it aside, and still
    encodes it in the sync it answers the server with, whose room keeps it aside too. Once sam
    is back and his edit is stored, hers takes effect there and is stored, and acknowledged to
    tina's device without a reconnect."""
    doc_id = "wo:ts-relay-2"
    sam = server.client("sam")
    ts = await ts_device(server, "tina", tmp_path / "tina.json")
    try:
        await sam.start()
        sam.doc(doc_id).apply_update(work_order(doc_id, assignee="tina").get_update())
        await sam.wait_acked(doc_id)
        await ts.start()
        await ts.wait_synced(doc_id)

        async def ts_notes() -> str:
            return str((await ts.dump_doc(doc_id))["json"]["notes"])

        with write_lock_held(server):
            sam.doc(doc_id).get("notes", type=Text).insert(0, "[sam]")
            async with asyncio.timeout(30):
                while True:
                    if "[sam]" in await ts_notes():
                        break
                    await asyncio.sleep(0.02)
            await ts.edit_doc(doc_id, [{"insert": [1.0, "[tina]"]}])  # after sam's
            await sam.go_offline()

            def reset() -> bool:
                return any(e["event"] == "reset" and e["value"]["doc"] == doc_id for e in ts.events)

            await eventually(reset, timeout=60)
        assert (await ts.state())["pending"] == 1
        await sam.start()
        await sam.wait_acked(doc_id)
        await ts.wait_acked(timeout=30)
        assert notes(await stored_doc(server, doc_id)) == "[sam][tina]"
    finally:
        await sam.close()
