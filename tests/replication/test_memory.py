"""Documents live in memory while replicas use them and leave it when idle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pycrdt import Doc

from fieldsync import documents
from fieldsync.app import ENDPOINTS, REPLICATOR
from fieldsync.auth import DevIssuer
from fieldsync.replication import SyncStep
from tests.harness import eventually, running_server, work_order
from tests.wire import connect


async def test_idle_documents_are_evicted_and_reload_identically(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    async with running_server(tmp_path, issuer, max_rooms=5) as server:
        replicator = server.app[REPLICATOR]
        written = {n: work_order(f"wo:e{n}") for n in range(12)}
        async with connect(server.sync_url, server.token("ada")) as wire:
            await wire.hello()
            for n in range(12):
                await wire.update(f"wo:e{n}", written[n].get_update())
                await wire.control("ack", doc=f"wo:e{n}")
            # The writer still replicates every document it wrote: none may be dropped.
            assert replicator.evict() == 0
            assert replicator.loaded == 12
        # Its socket is gone: the rooms are idle, and only `max_rooms` stay.
        await eventually(lambda: not server.app[ENDPOINTS].connections)
        replicator.evict()
        assert replicator.loaded == 5
        async with connect(server.sync_url, server.token("ada")) as wire:
            await wire.hello()
            await wire.step1("wo:e0")
            state = await wire.doc_message("wo:e0", SyncStep.STEP2)
        reloaded: Doc[Any] = Doc()
        reloaded.apply_update(state)
        expected = documents.to_json("wo:e0", written[0])
        assert documents.to_json("wo:e0", reloaded) == expected
