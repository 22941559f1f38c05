"""`opcua_readings` against a real asyncua server on a free loopback port and a real fieldsync
server: counters become the asset's meter reading and entries of its open work orders' logs;
bad values are counted, not fatal; the server going away and coming back costs a logged gap."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc

from fieldsync import documents
from fieldsync.adapters import AdapterConfigError, AdapterContext, HealthState, Table
from fieldsync.adapters._opcua_readings import OpcuaReadings, OpcuaReadingsConfig
from fieldsync.app import BACKEND, REPLICATOR
from fieldsync.records import Origin, OriginKind
from fieldsync.replication import Replicator, ServiceWriter
from fieldsync.storage import SQLiteBackend
from tests.adapters.contract import AdapterContract
from tests.adapters.plant import COUNTER, LABEL, add_assets, plc
from tests.harness import Server as FieldsyncServer
from tests.harness import eventually, free_port

ERP = Origin(OriginKind.ADAPTER, "erp")


def make(server: FieldsyncServer, port: int) -> OpcuaReadings:
    table = {
        "endpoint": f"opc.tcp://127.0.0.1:{port}/plc/",
        "nodes": {COUNTER: "P-100", LABEL: "P-200"},
        "interval_ms": 50,
        "watchdog_ms": 200,
        "reconnect_max_s": 1,
    }
    config = OpcuaReadingsConfig.from_table(Table("plc", table, {}))
    backend = server.app[BACKEND]
    writer = ServiceWriter(server.app[REPLICATOR])
    return OpcuaReadings("plc", config, writer, backend.reference, backend.screens)


async def asset(server: FieldsyncServer, asset_id: str) -> dict[str, Any]:
    return (await server.app[BACKEND].reference.rows("assets", [asset_id]))[asset_id]


async def open_order(server: FieldsyncServer, doc_id: str, asset_id: str) -> None:
    def create(doc: Doc[Any]) -> None:
        documents.work_order.write(
            doc,
            {"title": "Service press", "status": "new", "asset_id": asset_id, "team": "north"},
            by="adapter:erp",
            role="service",
        )

    assert await ServiceWriter(server.app[REPLICATOR]).edit(doc_id, create, ERP) is not None


async def readings_of(server: FieldsyncServer, doc_id: str) -> list[tuple[Any, str, bool]]:
    document = await ServiceWriter(server.app[REPLICATOR]).read(doc_id)
    assert document is not None
    return [(e["value"], e["by"], "rejected" in e) for e in document.get("meter_readings", [])]


@pytest.mark.slow  # an OPC UA server takes seconds to start and stop
async def test_counters_become_meter_readings_and_bad_values_change_nothing(
    server: FieldsyncServer,
) -> None:
    await add_assets(server.app[BACKEND].reference)
    await open_order(server, "wo:press-1", "P-100")
    port = free_port()
    async with plc(port, 100.0) as counter:
        adapter = make(server, port)
        await adapter.start()
        try:
            await eventually(lambda: adapter.metrics()["readings"] == 1)
            row = await asset(server, "P-100")
            assert (row["meter_reading"], row["team"]) == (100.0, "north")
            assert row["meter_at"].startswith("20")
            assert await readings_of(server, "wo:press-1") == [(100.0, "adapter:plc", False)]
            # The text node is no counter: counted, nothing recorded for P-200.
            assert adapter.metrics()["bad_values"] == 1
            assert "meter_reading" not in await asset(server, "P-200")

            await counter.write_value(120.5)
            await eventually(lambda: adapter.metrics()["readings"] == 2)
            assert (await asset(server, "P-100"))["meter_reading"] == 120.5

            await counter.write_value(90.0)  # backwards: a replaced counter, not recorded
            await eventually(lambda: adapter.metrics()["backwards"] == 1)
            await counter.write_value(math.nan)
            await eventually(lambda: adapter.metrics()["bad_values"] == 2)
            assert (await asset(server, "P-100"))["meter_reading"] == 120.5

            # Someone recorded a higher reading on the work order: the adapter's lower one is
            # judged by the never-decreasing rule like any device's, and rejected there.
            def higher(doc: Doc[Any]) -> None:
                documents.work_order.record_meter_reading(doc, 1000.0, by="adapter:erp")

            await ServiceWriter(server.app[REPLICATOR]).edit("wo:press-1", higher, ERP)
            await counter.write_value(130.0)
            await eventually(lambda: adapter.metrics()["readings"] == 3)
            await eventually(lambda: adapter.metrics()["work_order_entries"] == 3)
            assert (await asset(server, "P-100"))["meter_reading"] == 130.0
            assert await readings_of(server, "wo:press-1") == [
                (100.0, "adapter:plc", False),
                (120.5, "adapter:plc", False),
                (1000.0, "adapter:erp", False),
                (130.0, "adapter:plc", True),
            ]
            document = await ServiceWriter(server.app[REPLICATOR]).read("wo:press-1")
            assert document is not None
            assert document["fields"]["meter_reading"] == 1000.0

            # A cancelled work order is not open: the asset's row still gets the reading.
            def cancel(doc: Doc[Any]) -> None:
                documents.work_order.set_status(doc, "cancelled", by="adapter:erp", role="service")

            await ServiceWriter(server.app[REPLICATOR]).edit("wo:press-1", cancel, ERP)
            await counter.write_value(140.0)
            await eventually(lambda: adapter.metrics()["readings"] == 4)
            assert adapter.metrics()["work_order_entries"] == 3
            assert adapter.health().state is HealthState.OK
        finally:
            await adapter.stop()


@pytest.mark.slow
async def test_a_node_the_server_lacks_is_reported_and_the_others_still_read(
    server: FieldsyncServer,
) -> None:
    await add_assets(server.app[BACKEND].reference)
    port = free_port()
    table = {
        "endpoint": f"opc.tcp://127.0.0.1:{port}/plc/",
        "nodes": {COUNTER: "P-100", "ns=2;s=no.such.node": "P-200"},
        "interval_ms": 50,
    }
    config = OpcuaReadingsConfig.from_table(Table("plc", table, {}))
    backend = server.app[BACKEND]
    writer = ServiceWriter(server.app[REPLICATOR])
    adapter = OpcuaReadings("plc", config, writer, backend.reference, backend.screens)
    async with plc(port, 5.0):
        await adapter.start()
        try:
            await eventually(lambda: adapter.metrics()["readings"] == 1)
            health = adapter.health()
            assert health.state is HealthState.DEGRADED
            assert health.detail.startswith("subscribed to 1 of 2 node(s); refused: ns=2;s=no.such")
        finally:
            await adapter.stop()


@pytest.mark.slow
async def test_the_server_going_away_and_back_costs_a_logged_gap(
    server: FieldsyncServer, caplog: pytest.LogCaptureFixture
) -> None:
    await add_assets(server.app[BACKEND].reference)
    port = free_port()
    adapter = make(server, port)
    try:
        async with plc(port, 10.0):
            await adapter.start()
            await eventually(lambda: adapter.metrics()["readings"] == 1)
        # Stopped: the watchdog notices, and the adapter says so while it retries.
        await eventually(lambda: adapter.health().state is HealthState.DEGRADED)
        assert "reconnecting" in adapter.health().detail
        await eventually(lambda: adapter.metrics()["reconnects"] >= 2)
        async with plc(port, 25.0):
            await eventually(lambda: adapter.metrics()["readings"] == 2, timeout=30)
            assert adapter.health().state is HealthState.OK
            assert (await asset(server, "P-100"))["meter_reading"] == 25.0
            metrics = adapter.metrics()
            assert metrics["gaps"] == 1
            assert metrics["last_gap_s"] > 0
            assert "readings resumed after a gap of" in caplog.text
    finally:
        await adapter.stop()


def test_its_settings_are_checked_naming_the_key() -> None:
    base = {"endpoint": "opc.tcp://127.0.0.1:4840/", "nodes": {"i=2258": "P-1"}}
    config = OpcuaReadingsConfig.from_table(Table("plc", base, {}))
    assert config.nodes == {"i=2258": "P-1"}
    assert config.interval_ms == 1000
    cases: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "http://plc"}, "endpoint"),
        ({"nodes": {}}, "nodes"),
        ({"nodes": {"not a node": "P-1"}}, "nodes.not a node"),
        ({"nodes": {"i=2258": 7}}, "nodes.i=2258"),
        ({"interval_ms": 0}, "interval_ms"),
    ]
    for values, key in cases:
        with pytest.raises(AdapterConfigError) as error:
            OpcuaReadingsConfig.from_table(Table("plc", {**base, **values}, {}))
        assert error.value.key == key, values


class TestOpcuaReadingsContract(AdapterContract):
    kind = "opcua_readings"

    @pytest.fixture
    def adapter_context(self, tmp_path: Path, sqlite_backend: SQLiteBackend) -> AdapterContext:
        writer = ServiceWriter(Replicator(sqlite_backend.store))
        backend = sqlite_backend
        return AdapterContext(
            tmp_path, backend.outbox, backend.reference, writer, screens=backend.screens
        )

    def good_table(self) -> dict[str, Any]:
        # Nothing listens there: the adapter starts, says it is connecting, and stops.
        return {"endpoint": f"opc.tcp://127.0.0.1:{free_port()}/", "nodes": {COUNTER: "P-100"}}

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"endpoint": "opc.udp://plc"}, "endpoint"),
            ({"nodes": ["ns=2;i=1"]}, "nodes"),
            ({"interval_ms": "fast"}, "interval_ms"),
            ({"reconnect_max_s": 0}, "reconnect_max_s"),
        ]

    def test_it_needs_the_write_path(self, tmp_path: Path, sqlite_backend: SQLiteBackend) -> None:
        context = AdapterContext(tmp_path, sqlite_backend.outbox, sqlite_backend.reference)
        with pytest.raises(AdapterConfigError, match="write path"):
            self.build(context, self.good_table())
