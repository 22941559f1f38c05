"""The Python device client (`fieldsync.client`) killed at the worst instant: right after the
server told it to drop its copy of a work order (a reset), before the resync that re-applies its
unacknowledged edits. Started again on its local store, it must still deliver them."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from pycrdt import Text

from fieldsync.auth import DevIssuer
from tests.harness import Server, running_server, stored_doc, work_order

# The device's own process: online on its store, it kills itself with SIGKILL (no cleanup, no
# flush: what a crash or the OS ending the app leaves) as soon as it has acted on a reset.
DEVICE = """
import asyncio, os, signal, sys
from pathlib import Path
from fieldsync.client import Client

async def main() -> None:
    client = Client(sys.argv[1], sys.argv[2], path=Path(sys.argv[3]))
    client.on("reset", lambda body: os.kill(os.getpid(), signal.SIGKILL))
    await client.start()
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_edits_held_through_a_reset_survive_the_device_killed_before_its_resync(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    # An offline contract of a few microseconds: every reconnect is "too late", and reset.
    async with running_server(tmp_path / "srv", issuer, max_offline_days=1e-10) as server:
        doc_id, store = "wo:crash", tmp_path / "tina.db"
        await create(server, doc_id, tmp_path)
        tina = server.client("tina", path=store)
        await tina.start()
        await tina.wait_synced(doc_id)
        await tina.go_offline()
        tina.doc(doc_id).get("notes", type=Text).insert(0, "replaced the seal")
        assert tina.pending(doc_id) == 1
        await tina.close()

        device = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", DEVICE, server.sync_url, server.token("tina"), str(store)),
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(device.communicate(), timeout=60)
        assert device.returncode == -signal.SIGKILL, stderr.decode(errors="replace")

        again = server.client("tina", path=store)
        try:
            assert again.pending(doc_id) == 1  # held through the reset, in the store
            await again.start()
            await again.wait_acked(doc_id)
        finally:
            await again.close()
        assert str((await stored_doc(server, doc_id)).get("notes", type=Text)) == (
            "replaced the seal"
        )


async def create(server: Server, doc_id: str, tmp_path: Path) -> None:
    sam = server.client("sam", path=tmp_path / "sam.db")
    await sam.start()
    try:
        sam.doc(doc_id).apply_update(work_order(doc_id, status="in_progress").get_update())
        await sam.wait_acked()
    finally:
        await sam.close()
