"""`mqtt_alarms` across a restart of the broker (a Mosquitto of the test's own, persistent, the
shared one being no test's to stop): the adapter reports the broker gone and comes back; the
session the broker persisted brings back what was in hand at the stop, which has its effect
once; what is published after the restart has its effect."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pycrdt import Doc

from fieldsync.adapters import HealthState
from fieldsync.app import BACKEND, REPLICATOR
from fieldsync.records import Origin
from fieldsync.replication import ServiceWriter
from tests.adapters.plant import add_assets, alarm, own_broker, publish
from tests.adapters.test_mqtt_alarms import make, settled, started, work_orders
from tests.harness import Server, eventually


class _HoldAfterCommit:
    """The write path, but the caller of the edit of `hold` hears back only once `release` is
    set: its effect is committed, its message not yet acknowledged."""

    def __init__(self, writer: ServiceWriter, hold: str) -> None:
        self._writer = writer
        self._hold = hold
        self.committed = asyncio.Event()
        self.release = asyncio.Event()

    async def edit(
        self, doc_id: str, change: Callable[[Doc[Any]], None], origin: Origin
    ) -> int | None:
        seq = await self._writer.edit(doc_id, change, origin)
        document = await self._writer.read(doc_id)
        if (document or {}).get("fields", {}).get("alarm_last_at") == self._hold:
            self.committed.set()
            await self.release.wait()
        return seq

    async def read(self, doc_id: str) -> Mapping[str, Any] | None:
        return await self._writer.read(doc_id)


async def test_a_broker_restart_loses_nothing_and_repeats_nothing(
    tmp_path: Path, server: Server
) -> None:
    await add_assets(server.app[BACKEND].reference)
    prefix = f"fs-restart-{secrets.token_hex(4)}"
    topic = f"{prefix}/plant/line1/alarms"
    held = "2026-12-06T10:05:00+00:00"
    writer = _HoldAfterCommit(ServiceWriter(server.app[REPLICATOR]), hold=held)
    async with own_broker(tmp_path / "broker") as broker:
        adapter = make(server, prefix, tmp_path / "state", writer, url=broker.url)
        await started(adapter)
        try:
            await publish(topic, [alarm("r1")], broker.address)
            await settled(adapter, 1)
            # The next alarm's edit commits; the broker stops before its acknowledgement.
            await publish(topic, [alarm("r2", at=held)], broker.address)
            await writer.committed.wait()
            await broker.stop()
            writer.release.set()
            await eventually(lambda: adapter.health().state is HealthState.DEGRADED)
            down = adapter.health()
            assert "reconnecting" in down.detail

            await broker.start()  # the same port, the same persistence
            # Published before the adapter is back: the session the broker restored keeps it.
            await publish(
                topic, [alarm("r3", asset_id="P-200", alarm="jam", severity=600)], broker.address
            )
            await eventually(lambda: adapter.health().state is HealthState.OK, timeout=30)
            # r2 comes again (unacknowledged in the persisted session), and is recognised.
            await settled(adapter, 4)
            orders = await work_orders(server)
            assert len(orders) == 2
            (pump,) = [o for o in orders.values() if o["fields"]["asset_id"] == "P-100"]
            (press,) = [o for o in orders.values() if o["fields"]["asset_id"] == "P-200"]
            assert pump["fields"]["alarm_count"] == 2
            assert pump["fields"]["alarm_last_at"] == held
            assert press["fields"]["alarm"] == "jam"
            metrics = adapter.metrics()
            assert metrics["duplicates"] == 1
            assert metrics["work_orders_opened"] == 2
            assert metrics["reconnects"] >= 1
        finally:
            writer.release.set()
            await adapter.stop()
