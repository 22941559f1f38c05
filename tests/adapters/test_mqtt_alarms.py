"""`mqtt_alarms` against the real Mosquitto on loopback and a real server: alarms open work
orders through the write path, repeats count on the open one, a cleared alarm notes it; each
message has its effect once, across restarts, crashes and redeliveries; bad messages are set
aside; a flood is absorbed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc

from fieldsync import documents
from fieldsync.adapters import AdapterConfigError, AdapterContext, HealthState, Table
from fieldsync.adapters._mqtt_alarms import BadAlarm, MqttAlarms, MqttAlarmsConfig, parse_alarm
from fieldsync.app import ADAPTERS, BACKEND, REPLICATOR
from fieldsync.auth import DevIssuer
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import Replicator, ServiceWriter
from fieldsync.storage import SQLiteBackend
from tests.adapters.contract import AdapterContract
from tests.adapters.plant import (
    COUNTER,
    add_assets,
    alarm,
    broker_or_skip,
    flood,
    plc,
    publish,
)
from tests.harness import Server, eventually, free_port, running_server


@pytest.fixture
def prefix() -> str:
    return broker_or_skip()


@pytest.fixture
async def assets(server: Server) -> None:
    await add_assets(server.app[BACKEND].reference)


def make(server: Server, prefix: str, state: Path, writer: Any = None, **keys: Any) -> MqttAlarms:
    table = {
        "url": "mqtt://127.0.0.1:1883",
        "topics": [f"{prefix}/plant/+/alarms"],
        "min_severity": 500,
        "client_id": f"{prefix}-alarms",
        "session_expiry_s": 120,
        **keys,
    }
    config = MqttAlarmsConfig.from_table("alarms", Table("alarms", table, {}))
    writer = writer or ServiceWriter(server.app[REPLICATOR])
    return MqttAlarms("alarms", config, writer, server.app[BACKEND].reference, state)


async def started(adapter: MqttAlarms) -> MqttAlarms:
    await adapter.start()
    await eventually(lambda: adapter.health().state is HealthState.OK)
    return adapter


@pytest.fixture
async def adapter(
    tmp_path: Path, server: Server, prefix: str, assets: None
) -> AsyncIterator[MqttAlarms]:
    adapter = await started(make(server, prefix, tmp_path / "state"))
    yield adapter
    await adapter.stop()


async def settled(adapter: MqttAlarms, count: int) -> None:
    await eventually(lambda: adapter.metrics()["settled"] >= count)
    assert adapter.metrics()["settled"] == count


async def work_orders(server: Server) -> dict[str, Mapping[str, Any]]:
    """The alarm work orders the server holds, by id."""
    writer = ServiceWriter(server.app[REPLICATOR])
    page = await server.app[BACKEND].store.changes(ScopeFilter(ScopeKind.ALL), 0, 1000)
    found = {}
    for changed in page.docs:
        if changed.id.startswith("wo:alarm-"):
            document = await writer.read(changed.id)
            assert document is not None
            found[changed.id] = document
    return found


async def test_an_alarm_opens_a_work_order_repeats_count_and_a_clear_is_noted(
    server: Server, prefix: str, adapter: MqttAlarms
) -> None:
    topic = f"{prefix}/plant/line1/alarms"
    await publish(
        topic,
        [
            alarm("a1", at="2026-12-06T10:00:00+00:00"),
            alarm("a2", at="2026-12-06T10:05:00+00:00"),
            alarm("a2"),  # the same message again: no effect
            alarm("low", severity=100),  # below min_severity: no work order
            alarm("a3", state="cleared", at="2026-12-06T10:07:00+00:00", message="back to normal"),
            alarm("b1", asset_id="P-200", alarm="jam", severity=600),
        ],
    )
    await settled(adapter, 6)
    orders = await work_orders(server)
    assert len(orders) == 2
    (pump,) = [o for o in orders.values() if o["fields"]["asset_id"] == "P-100"]
    (press,) = [o for o in orders.values() if o["fields"]["asset_id"] == "P-200"]
    fields = pump["fields"]
    assert (fields["team"], fields["region"], fields["site"]) == ("north", "east", "plant-a")
    assert (fields["status"], fields["priority"], fields["alarm"]) == ("new", "urgent", "overtemp")
    assert (fields["alarm_count"], fields["alarm_last_at"]) == (2, "2026-12-06T10:05:00+00:00")
    assert fields["alarm_state"] == "cleared"
    assert pump["notes"].splitlines() == [
        "2026-12-06T10:00:00+00:00 active (severity 900): bearing temperature high",
        "2026-12-06T10:07:00+00:00 cleared: back to normal",
    ]
    assert [(e["status"], e["by"]) for e in pump["status_log"]] == [("new", "adapter:alarms")]
    assert (press["fields"]["priority"], press["fields"]["team"]) == ("high", "south")
    metrics = adapter.metrics()
    assert (metrics["duplicates"], metrics["below_severity"], metrics["work_orders_opened"]) == (
        1,
        1,
        2,
    )

    # Someone cancels the pump's work order: the next alarm opens a new one.
    (pump_id,) = [i for i, o in orders.items() if o is pump]
    erp = Origin(OriginKind.ADAPTER, "erp")

    def cancel(doc: Doc[Any]) -> None:
        documents.work_order.set_status(doc, "cancelled", by="adapter:erp", role="service")

    assert await ServiceWriter(server.app[REPLICATOR]).edit(pump_id, cancel, erp) is not None
    await publish(topic, [alarm("a4", at="2026-12-06T11:00:00+00:00")])
    await settled(adapter, 7)
    orders = await work_orders(server)
    assert len(orders) == 3
    newest = [o for i, o in orders.items() if o["fields"]["asset_id"] == "P-100" and i != pump_id]
    assert [(o["fields"]["alarm_count"], o["fields"]["status"]) for o in newest] == [(1, "new")]
    assert adapter.health().state is HealthState.OK


async def test_alarms_published_while_it_was_down_arrive_after_a_restart(
    tmp_path: Path, server: Server, prefix: str, assets: None
) -> None:
    """The persistent session: the broker keeps what was published for the adapter's client id
    while the adapter was stopped, and delivers it when it comes back."""
    first = await started(make(server, prefix, tmp_path / "state"))
    await first.stop()
    topic = f"{prefix}/plant/line2/alarms"
    await publish(topic, [alarm(f"d{i}", at=f"2026-12-06T10:0{i}:00+00:00") for i in range(3)])
    again = await started(make(server, prefix, tmp_path / "state"))
    try:
        await settled(again, 3)
        (order,) = (await work_orders(server)).values()
        assert (order["fields"]["alarm_count"], order["fields"]["alarm_last_at"]) == (
            3,
            "2026-12-06T10:02:00+00:00",
        )
    finally:
        await again.stop()


class _CrashAfterCommit:
    """The write path, but the first edit's caller never hears back that it committed: what a
    process killed between the document's commit and the adapter's state file sees."""

    def __init__(self, writer: ServiceWriter) -> None:
        self._writer = writer
        self.crashed = False

    async def edit(
        self, doc_id: str, change: Callable[[Doc[Any]], None], origin: Origin
    ) -> int | None:
        seq = await self._writer.edit(doc_id, change, origin)
        if not self.crashed:
            self.crashed = True
            raise ConnectionResetError("killed after the commit")
        return seq

    async def read(self, doc_id: str) -> Mapping[str, Any] | None:
        return await self._writer.read(doc_id)


async def test_a_redelivery_after_a_crash_applies_nothing_twice(
    tmp_path: Path, server: Server, prefix: str, assets: None
) -> None:
    writer = _CrashAfterCommit(ServiceWriter(server.app[REPLICATOR]))
    adapter = await started(make(server, prefix, tmp_path / "state", writer))
    try:
        await publish(f"{prefix}/plant/line3/alarms", [alarm("c1"), alarm("c2")])
        # Unacknowledged, the messages come again after the reconnection.
        await settled(adapter, 2)
        assert writer.crashed
        (order,) = (await work_orders(server)).values()
        assert order["fields"]["alarm_count"] == 2
        assert adapter.metrics()["reconnects"] >= 1
    finally:
        await adapter.stop()
    # And after a restart, the same ids still have no effect.
    again = await started(make(server, prefix, tmp_path / "state"))
    try:
        await publish(f"{prefix}/plant/line3/alarms", [alarm("c1"), alarm("c2")])
        await settled(again, 2)
        assert again.metrics()["duplicates"] == 2
        (order,) = (await work_orders(server)).values()
        assert order["fields"]["alarm_count"] == 2
    finally:
        await again.stop()


async def test_poison_messages_are_set_aside_with_their_reason(
    server: Server, prefix: str, adapter: MqttAlarms
) -> None:
    topic = f"{prefix}/plant/line4/alarms"
    await publish(
        topic,
        [
            b"{not json",
            b'{"id": "x1", "asset_id": "P-100"}',
            alarm("x2", severity="high"),  # type: ignore[arg-type]
            alarm("x3", asset_id="NO-SUCH-ASSET"),
            alarm("x4", message="m" * 20000),
            alarm("ok1"),
        ],
    )
    await settled(adapter, 6)
    metrics = adapter.metrics()
    assert (
        metrics["rejected_malformed"],
        metrics["rejected_unknown_asset"],
        metrics["rejected_oversized"],
        metrics["rejected"],
    ) == (2 + 1, 1, 1, 5)
    kept = await adapter.rejected()
    reasons = [k["reason"] for k in reversed(kept)]
    assert reasons[0] == "malformed: not JSON"
    assert reasons[1].startswith("malformed: `alarm` must be text")
    assert reasons[2] == "malformed: `severity` must be an integer"
    assert any(r.startswith("unknown asset 'NO-SUCH-ASSET'") for r in reasons)
    assert any(r.startswith("oversized: ") for r in reasons)
    assert all(k["topic"] == topic for k in kept)
    assert len(await work_orders(server)) == 1  # the good one still went through
    health = adapter.health()
    assert health.state is HealthState.OK
    assert "; 5 message(s) set aside, latest: " in health.detail


@pytest.mark.slow
async def test_a_flood_is_absorbed_in_bounded_batches_and_devices_are_unaffected(
    tmp_path: Path, server: Server, prefix: str, assets: None
) -> None:
    """10,000 alarms in a burst from another process: each applied once, repeats coalesced into
    few edits, never more in hand than the window the broker was given."""
    adapter = await started(make(server, prefix, tmp_path / "state"))
    try:
        topic = f"{prefix}/plant/line5/alarms"
        payloads = [
            alarm(f"f{i}", asset_id=("P-100", "P-200")[i % 2], alarm=f"a{i % 5}")
            for i in range(10_000)
        ]
        burst = asyncio.create_task(flood(topic, payloads))
        await eventually(lambda: adapter.metrics()["messages_in"] > 0)
        # A device's write meanwhile is committed as ever.
        writer = ServiceWriter(server.app[REPLICATOR])
        began = time.monotonic()
        seq = await writer.edit(
            "wo:device-during-flood",
            lambda doc: documents.work_order.write(
                doc, {"title": "t", "status": "new"}, by="adapter:device", role="service"
            ),
            Origin(OriginKind.ADAPTER, "device"),
        )
        assert seq is not None
        assert time.monotonic() - began < 2.0
        await burst
        await eventually(lambda: adapter.metrics()["settled"] >= 10_000, timeout=60)
        metrics = adapter.metrics()
        assert metrics["settled"] == 10_000
        assert metrics["batch_peak"] <= adapter.config.in_flight
        assert metrics["effects"] < 1000  # coalesced: far fewer edits than alarms
        orders = await work_orders(server)
        assert len(orders) == 10
        assert sum(o["fields"]["alarm_count"] for o in orders.values()) == 10_000
    finally:
        await adapter.stop()


async def test_a_stop_in_the_middle_of_a_stream_loses_nothing_and_repeats_nothing(
    tmp_path: Path, server: Server, prefix: str, assets: None
) -> None:
    """Stopped while alarms stream in (a small window: most wait at the broker), then started
    again: every alarm counted once, whatever was in hand at the stop."""
    first = await started(make(server, prefix, tmp_path / "state", in_flight=50))
    topic = f"{prefix}/plant/line6/alarms"
    burst = asyncio.create_task(flood(topic, [alarm(f"s{i}") for i in range(800)]))
    await eventually(lambda: first.metrics()["settled"] >= 100)
    await first.stop()
    await burst
    assert first.metrics()["settled"] < 800  # the rest waits at the broker
    again = await started(make(server, prefix, tmp_path / "state", in_flight=50))
    try:
        # What the first one applied without its acknowledgement reaching the broker comes
        # again, and is recognised.
        def applied() -> float:
            later = again.metrics()
            return first.metrics()["settled"] + later["settled"] - later["duplicates"]

        await eventually(lambda: applied() >= 800)
        (order,) = (await work_orders(server)).values()
        assert order["fields"]["alarm_count"] == 800
        assert applied() == 800
    finally:
        await again.stop()


async def test_an_unreachable_broker_is_reported_and_retried(
    tmp_path: Path, server: Server, prefix: str
) -> None:
    adapter = make(server, prefix, tmp_path / "state", url=f"mqtt://127.0.0.1:{free_port()}")
    await adapter.start()
    try:
        await eventually(lambda: adapter.metrics()["reconnects"] >= 1)
        health = adapter.health()
        assert health.state is HealthState.DEGRADED
        assert health.detail.startswith("mqtt://127.0.0.1:")
        assert "reconnecting" in health.detail
    finally:
        await adapter.stop()


def test_the_payload_schema() -> None:
    parsed = parse_alarm(alarm("p1", at="2026-12-06T10:00:00Z"))
    assert (parsed.id, parsed.severity, parsed.state) == ("p1", 900, "active")
    for bad, reason in [
        (b"[]", "not a JSON object"),
        (alarm("p", state="gone"), "`state`"),
        (alarm("p", at="yesterday"), "`at`"),
        (alarm("p", severity=True), "`severity`"),
        (alarm(""), "`id`"),
    ]:
        with pytest.raises(BadAlarm, match=reason):
            parse_alarm(bad)


def test_its_settings_are_checked_naming_the_key() -> None:
    base = {"url": "mqtt://127.0.0.1:1883", "topics": ["plant/+/alarms"], "min_severity": 500}
    config = MqttAlarmsConfig.from_table("alarms", Table("alarms", base, {}))
    assert (config.client_id, config.host, config.port) == ("fieldsync-alarms", "127.0.0.1", 1883)
    priorities = [config.priority(s) for s in (0, 499, 500, 999)]
    assert priorities == ["normal", "normal", "high", "urgent"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://broker"}, "url"),
        ({"url": "mqtt://:1883"}, "url"),
        ({"topics": []}, "topics"),
        ({"topics": ["plant/#/alarms"]}, "topics"),
        ({"topics": ["plant/a+/alarms"]}, "topics"),
        ({"min_severity": "high"}, "min_severity"),
        ({"in_flight": 0}, "in_flight"),
        ({"priorities": {"urgent": "soon"}}, "priorities.urgent"),
    ]
    for values, key in cases:
        with pytest.raises(AdapterConfigError) as error:
            MqttAlarmsConfig.from_table("alarms", Table("alarms", {**base, **values}, {}))
        assert error.value.key == key, values


class TestMqttAlarmsContract(AdapterContract):
    kind = "mqtt_alarms"

    @pytest.fixture(autouse=True)
    def _broker(self) -> None:
        self.prefix = broker_or_skip()

    @pytest.fixture
    def adapter_context(self, tmp_path: Path, sqlite_backend: SQLiteBackend) -> AdapterContext:
        writer = ServiceWriter(Replicator(sqlite_backend.store))
        return AdapterContext(tmp_path, sqlite_backend.outbox, sqlite_backend.reference, writer)

    def good_table(self) -> dict[str, Any]:
        return {
            "url": "mqtt://127.0.0.1:1883",
            "topics": [f"{self.prefix}/+/alarms"],
            "min_severity": 500,
            "client_id": f"{self.prefix}-contract",
            "session_expiry_s": 60,
        }

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"url": "tcp://broker:1883"}, "url"),
            ({"topics": "plant/+/alarms"}, "topics"),
            ({"min_severity": 1.5}, "min_severity"),
            ({"client_id": ""}, "client_id"),
            ({"max_message_bytes": 10}, "max_message_bytes"),
        ]

    def test_it_needs_the_write_path(self, tmp_path: Path, sqlite_backend: SQLiteBackend) -> None:
        context = AdapterContext(tmp_path, sqlite_backend.outbox, sqlite_backend.reference)
        with pytest.raises(AdapterConfigError, match="write path"):
            self.build(context, self.good_table())


@pytest.mark.slow  # an OPC UA server takes seconds to start and stop
async def test_the_server_runs_both_plant_kinds_from_the_adapters_file(
    tmp_path: Path, issuer: DevIssuer, prefix: str
) -> None:
    """Wired as operators wire them: the adapters file names both kinds, the server starts them
    with the write path, and their health and figures are in `/v1/ready` and `/v1/metrics`."""
    port = free_port()
    path = tmp_path / "adapters.toml"
    path.write_text(
        "[adapters.alarms]\n"
        'kind = "mqtt_alarms"\n'
        'url = "mqtt://127.0.0.1:1883"\n'
        f'topics = ["{prefix}/+/alarms"]\n'
        "min_severity = 500\n"
        f'client_id = "{prefix}-served"\n'
        "session_expiry_s = 60\n"
        "[adapters.press]\n"
        'kind = "opcua_readings"\n'
        f'endpoint = "opc.tcp://127.0.0.1:{port}/plc/"\n'
        "interval_ms = 50\n"
        "[adapters.press.nodes]\n"
        f'"{COUNTER}" = "P-100"\n'
    )
    async with (
        plc(port, 7.0) as counter,
        running_server(tmp_path / "data", issuer, adapters=str(path)) as server,
    ):
        await add_assets(server.app[BACKEND].reference)
        alarms, press = server.app[ADAPTERS].adapters
        await eventually(lambda: alarms.health().state is HealthState.OK)
        await publish(f"{prefix}/line9/alarms", [alarm("s1")])
        await eventually(lambda: alarms.metrics()["effects"] == 1)
        # The alarm's work order is open for P-100: a reading is an entry of its log too.
        await eventually(lambda: press.health().state is HealthState.OK, timeout=20)
        await counter.write_value(8.0)
        await eventually(lambda: press.metrics()["work_order_entries"] == 1)
        headers = {"Authorization": f"Bearer {server.token('ada')}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(server.url + "/v1/ready") as response:
                ready = await response.json()
            async with http.get(server.url + "/v1/metrics") as response:
                metrics = await response.json()
        assert ready["adapters"]["alarms"]["state"] == "ok"
        assert ready["adapters"]["press"] == {
            "kind": "opcua_readings",
            "state": "ok",
            "detail": "subscribed to 1 node(s)",
        }
        assert metrics["adapters"]["alarms"]["messages_in"] == 1
        assert metrics["adapters"]["press"]["work_order_entries"] == 1
