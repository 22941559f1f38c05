"""The plant floor the `mqtt_alarms` and `opcua_readings` tests run against: the loopback
Mosquitto (each test on topics and client ids of its own, the broker being shared), an OPC UA
server on a free loopback port, and the asset register they read; a Mosquitto of a test's own
where the test stops the broker. Without the broker a test is
skipped, or fails when `FIELDSYNC_REQUIRE_SERVICES=1`."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import aiomqtt
import orjson
from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server

from fieldsync.storage import ReferenceStore
from tests.harness import free_port, unavailable

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
    unavailable(message)


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


async def publish(topic: str, payloads: Iterable[bytes], broker: tuple[str, int] = BROKER) -> None:
    """Publish with QoS 1, as a plant gateway does, each acknowledged by the broker."""
    async with aiomqtt.Client(*broker, identifier=f"pub-{secrets.token_hex(4)}") as client:
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


class Mosquitto:
    """A Mosquitto of a test's own, which it may stop and start again (the shared one it must
    not): on a free loopback port, its persistence in the test's folder, a queue large enough
    for a burst."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
        if binary is None:
            _missing("mosquitto (the broker) is not installed")
        self.binary = binary
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Run as root, it would switch to the `mosquitto` user, who cannot write here.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {folder}/\n"
            "max_queued_messages 20000\n"
            f"log_dest file {folder / 'mosquitto.log'}\n"
        )
        self._process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            self.binary, "-c", str(self.config), stderr=asyncio.subprocess.DEVNULL
        )
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection(*self.address)
                except OSError:
                    if self._process.returncode is not None:
                        raise AssertionError(
                            f"mosquitto exited: {self._process.returncode}"
                        ) from None
                    await asyncio.sleep(0.02)  # the port has no event to wait on
                    continue
                writer.close()
                await writer.wait_closed()
                return

    async def stop(self) -> None:
        """SIGTERM, as a service manager stops it (it writes its persistence file), and wait."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()


@asynccontextmanager
async def own_broker(folder: Path) -> AsyncIterator[Mosquitto]:
    broker = Mosquitto(folder)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


COUNTER = "ns=2;s=P-100.counter"  # a Double
LABEL = "ns=2;s=P-200.label"  # a String: no counter at all


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
