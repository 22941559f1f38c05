"""The plant floor the `mqtt_alarms` and `opcua_readings` tests run against: the loopback
Mosquitto (each test on topics and client ids of its own, the broker being shared), an OPC UA
server on a free loopback port, and the asset register they read. Without the broker a test is
skipped, or fails when `FIELDSYNC_REQUIRE_SERVICES=1`."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import aiomqtt
import orjson
import pytest
from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server

from fieldsync.storage import ReferenceStore

BROKER = ("127.0.0.1", 1883)
ASSETS = [
    {"id": "P-100", "team": "north", "region": "east", "site": "plant-a", "name": "Feed pump"},
    {"id": "P-200", "team": "south", "region": "west", "site": "plant-b", "name": "Press"},
]


def broker_or_skip() -> str:
    """A prefix of topics and client ids no other test uses, once the broker answers."""
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError as error:
        _missing(f"Mosquitto is not reachable at {BROKER[0]}:{BROKER[1]}: {error}")
    return f"fs-test-{secrets.token_hex(5)}"


def _missing(message: str) -> NoReturn:
    if os.environ.get("FIELDSYNC_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (FIELDSYNC_REQUIRE_SERVICES=1)")
    pytest.skip(message)


async def add_assets(reference: ReferenceStore, rows: Iterable[Mapping[str, Any]] = ASSETS) -> None:
    await reference.import_rows("assets", list(rows), key="id", full=False)


def alarm(
    id: str,
    asset_id: str = "P-100",
    alarm: str = "overtemp",
    severity: int = 900,
    state: str = "active",
    at: str = "2026-12-06T10:00:00+00:00",
    message: str = "bearing temperature high",
) -> bytes:
    return orjson.dumps(
        {
            "id": id,
            "asset_id": asset_id,
            "alarm": alarm,
            "severity": severity,
            "state": state,
            "at": at,
            "message": message,
        }
    )


async def publish(topic: str, payloads: Iterable[bytes]) -> None:
    """Publish with QoS 1, as a plant gateway does, each acknowledged by the broker."""
    async with aiomqtt.Client(*BROKER, identifier=f"pub-{secrets.token_hex(4)}") as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


async def flood(topic: str, payloads: Iterable[bytes]) -> None:
    """Publish a burst from another process, as fast as the broker takes it (`mosquitto_pub`
    sends a message per line of its input)."""
    if shutil.which("mosquitto_pub") is None:
        _missing("mosquitto_pub (the Mosquitto clients) is not installed")
    lines = b"".join(payload + b"\n" for payload in payloads)
    host, port = BROKER
    process = await asyncio.create_subprocess_exec(
        *("mosquitto_pub", "-h", host, "-p", str(port), "-q", "1", "-t", topic, "-l"),
        stdin=asyncio.subprocess.PIPE,
    )
    await process.communicate(lines)
    assert process.returncode == 0


COUNTER = "ns=2;s=P-100.counter"  # a Double
LABEL = "ns=2;s=P-200.label"  # a String: no counter at all


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def plc(port: int, counter: float) -> AsyncIterator[Node]:
    """An OPC UA server as a line's controller is one: a counter and a text node; yields the
    counter's node, which the test writes as the machine would."""
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/plc/")
    index = await server.register_namespace("urn:fieldsync:test:plc")
    assert index == 2
    line = await server.nodes.objects.add_object(
        ua.NodeId(ua.String("Line1"), ua.Int16(index)), "Line1"
    )
    node = await line.add_variable(
        ua.NodeId(ua.String("P-100.counter"), ua.Int16(index)), "counter", counter
    )
    await line.add_variable(
        ua.NodeId(ua.String("P-200.label"), ua.Int16(index)), "label", "running"
    )
    await server.start()
    try:
        yield node
    finally:
        await server.stop()
