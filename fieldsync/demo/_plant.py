"""The demo's plant floor, when an MQTT broker is reachable: an `mqtt_alarms` adapter on topics
of this run's own, an OPC UA server in this process (a run-hours counter per demo asset) read by
an `opcua_readings` adapter, and the demo's assets in the `assets` reference dataset they both
need. After the simulation, one alarm becomes a work order and one meter reading lands in it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt
import orjson
from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server

from fieldsync.demo import _dataset
from fieldsync.replication import ServiceWriter

if TYPE_CHECKING:
    from fieldsync.demo._server import Running

DEFAULT_BROKER = "127.0.0.1:1883"
ALARMS, METERS = "plant_alarms", "plant_meters"  # the adapters' names in the adapters file
ALARM, SEVERITY = "overpressure", 700  # severity 700: priority high
_PROBE = 2.0  # seconds the broker has to answer
_WAIT = 20.0  # seconds the demo waits for the alarm's work order, then for the reading
_NS = "urn:fieldsync:demo:plc"
T = TypeVar("T")


@dataclass
class Floor:
    """This run's plant floor; `skipped` says why there is none."""

    skipped: str | None = None
    broker: tuple[str, int] = ("127.0.0.1", 1883)
    prefix: str = ""  # of this run's topics and client id
    opcua_endpoint: str = ""
    assets: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, Node] = field(default_factory=dict)  # asset id -> its counter node

    def adapters(self) -> str:
        """The plant floor's sections of the demo's adapters file."""
        if self.skipped is not None:
            return ""
        host, port = self.broker
        nodes = "".join(f'"ns=2;s={a["id"]}.run_hours" = "{a["id"]}"\n' for a in self.assets)
        return (
            "\n# The plant floor: alarms on the MQTT broker open work orders; machine counters on\n"
            "# the demo's OPC UA server are meter readings (README: mqtt_alarms, opcua_readings).\n"
            f'[adapters.{ALARMS}]\nkind = "mqtt_alarms"\nurl = "mqtt://{host}:{port}"\n'
            f'topics = ["{self.prefix}/plant/+/alarms"]\nmin_severity = 500\n'
            f'client_id = "{self.prefix}-alarms"\nsession_expiry_s = 60\n'
            f'\n[adapters.{METERS}]\nkind = "opcua_readings"\n'
            f'endpoint = "{self.opcua_endpoint}"\ninterval_ms = 100\n'
            f"\n[adapters.{METERS}.nodes]\n{nodes}"
        )


def parse_broker(text: str) -> tuple[str, int]:
    """`host:port` (the port defaults to 1883); raises ValueError naming what is wrong."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--mqtt {text!r}: expected host:port, or off")
    return host, int(port)


def demo_assets(today: date) -> list[dict[str, Any]]:
    """An asset per team, those of the dataset's first work orders: their reference rows."""
    rows = {}
    for wo in _dataset.work_orders(len(_dataset.TEAMS), today):
        fields = wo.fields
        title = str(fields["title"])
        rows[fields["asset_id"]] = {
            "id": fields["asset_id"],
            "name": title.split(" on ", 1)[-1],
            **{k: fields[k] for k in ("team", "region", "site")},
        }
    return list(rows.values())


def _run_hours() -> float:
    """A counter that only goes up, run after run: hours since 2020 (to 0.36 s)."""
    return round((time.time() - datetime(2020, 1, 1, tzinfo=UTC).timestamp()) / 3600, 4)


@asynccontextmanager
async def floor(broker: str | None, today: date) -> AsyncIterator[Floor]:
    """The plant floor for a broker at `broker` (None: none wanted); its OPC UA server runs for
    the block."""
    if broker is None:
        yield Floor(skipped="--mqtt off")
        return
    address = parse_broker(broker)
    prefix = f"fieldsync-demo-{secrets.token_hex(4)}"
    try:  # an MQTT handshake: something listening there may be no broker
        async with aiomqtt.Client(*address, identifier=f"{prefix}-probe", timeout=_PROBE):
            pass
    except aiomqtt.MqttError as exc:
        yield Floor(skipped=f"no MQTT broker at {broker} ({exc})")
        return
    # The in-process OPC UA server warns of its unencrypted endpoint: a demo on loopback.
    quiet = logging.getLogger("asyncua")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    assets = demo_assets(today)
    try:
        server, counters, endpoint = await _plc(assets)
    except OSError as exc:
        quiet.setLevel(level)
        yield Floor(skipped=f"the demo's OPC UA server could not start: {exc}")
        return
    try:
        yield Floor(
            broker=address,
            prefix=prefix,
            opcua_endpoint=endpoint,
            assets=assets,
            counters=counters,
        )
    finally:
        await server.stop()
        quiet.setLevel(level)


async def _plc(assets: list[dict[str, Any]]) -> tuple[Server, dict[str, Node], str]:
    """The OPC UA server of a line's controller, started: a run-hours counter per asset."""
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{_free_port()}/demo-plc/"
    server.set_endpoint(endpoint)
    index = await server.register_namespace(_NS)
    line_id = ua.NodeId(ua.String("Line1"), ua.Int16(index))
    line = await server.nodes.objects.add_object(line_id, "Line1")
    counters = {}
    for asset in assets:
        node_id = ua.NodeId(ua.String(f"{asset['id']}.run_hours"), ua.Int16(index))
        counters[asset["id"]] = await line.add_variable(node_id, "run_hours", _run_hours())
    await server.start()
    return server, counters, endpoint


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def register_assets(floor: Floor, server: Running) -> None:
    """The demo's assets in the `assets` reference dataset (as `fieldsync reference import`
    would put them there), which both plant adapters look assets up in."""
    if floor.skipped is None:
        await server.backend.reference.import_rows("assets", floor.assets, key="id", full=False)


async def show(floor: Floor, server: Running) -> str:
    """Raise one alarm and one meter reading, wait (bounded) for their effect, and say what
    landed: the plant floor's summary line."""
    if floor.skipped is not None:
        return f"skipped: {floor.skipped}"
    asset = floor.assets[0]
    alarm_id = f"{floor.prefix}-1"
    payload = {
        "id": alarm_id,
        "asset_id": asset["id"],
        "alarm": ALARM,
        "severity": SEVERITY,
        "state": "active",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "message": "discharge pressure above limit",
    }
    try:
        async with aiomqtt.Client(*floor.broker, identifier=f"{floor.prefix}-gateway") as client:
            await client.publish(f"{floor.prefix}/plant/line1/alarms", orjson.dumps(payload), 1)
    except aiomqtt.MqttError as exc:
        return f"FAILED: the alarm could not be published: {exc}"
    reader = ServiceWriter(server.replicator)
    order = await _wait(lambda: _alarm_order(server, reader, asset["id"], alarm_id))
    if order is None:
        return f"FAILED: no work order for alarm {alarm_id} after {_WAIT:.0f}s"
    doc_id, document = order
    fields = document["fields"]
    said = f"alarm {asset['id']}/{ALARM} -> {doc_id} (priority {fields.get('priority')})"
    # The counter goes on from where it stands: above what this run and the earlier ones read.
    counter = floor.counters[asset["id"]]
    reading = max(_run_hours(), round(await counter.read_value() + 0.0001, 4))
    await counter.write_value(reading)

    async def landed() -> bool | None:
        document = await reader.read(doc_id)
        readings = (document or {}).get("meter_readings") or []
        return True if any(r.get("value") == reading for r in readings) else None

    if await _wait(landed) is None:
        return f"{said}; FAILED: meter reading {reading} not in it after {_WAIT:.0f}s"
    return f"{said}; meter {asset['id']} {reading} -> {doc_id} meter_readings"


async def _alarm_order(
    server: Running, reader: ServiceWriter, asset_id: str, alarm_id: str
) -> tuple[str, Mapping[str, Any]] | None:
    """The asset's open work order the alarm `alarm_id` opened or counted on, once it did."""
    for doc_id in await server.backend.screens.open_work_orders(asset_id, 10):
        if doc_id.startswith("wo:alarm-"):
            document = await reader.read(doc_id)
            if document is not None and document["fields"].get("alarm_last_id") == alarm_id:
                return doc_id, document
    return None


async def _wait(probe: Callable[[], Awaitable[T | None]]) -> T | None:
    """`await probe()` until it returns something, for at most `_WAIT` seconds."""
    deadline = time.monotonic() + _WAIT
    while time.monotonic() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.1)  # the adapters' effects have no event the demo can wait on
    return None
