"""`opcua_readings`: machine counters read over OPC UA become meter readings.

The adapter subscribes to the configured nodes (node id -> asset id) of an OPC UA server and
turns each data change into a reading of the asset's meter: the asset's reference row
(`meter_reading`, `meter_at`, through `ReferenceStore`) and, while the asset has open work
orders (the document index, `Screens.open_work_orders`), an entry of each one's
`meter_readings` log in the adapter's name, through the device write path, where the rule that
a meter never decreases applies as to any device's reading.

Readings are coalesced per node (a counter's latest value says all its earlier ones did), so
what waits here is one value per configured node however fast the server publishes. A value
that is no number (a wrong type, NaN, infinite) or below the reading already recorded (a
counter that went backwards: replaced, reset) is counted and logged, and changes nothing.

A watchdog reads the server's state every `watchdog_ms`; when it fails, or the connection is
lost, the adapter reconnects with backoff and creates its subscription again, and logs and
counts the gap in readings once they resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif
from pycrdt import Doc

from fieldsync.adapters._base import DocumentWriter, Health, HealthState
from fieldsync.adapters._config import AdapterContext, Table, redact_url
from fieldsync.adapters._runner import Backoff
from fieldsync.documents import work_order
from fieldsync.errors import FieldsyncError
from fieldsync.records import Origin, OriginKind
from fieldsync.storage import ReferenceStore, Screens

__all__ = ["OpcuaReadings", "OpcuaReadingsConfig", "opcua_readings"]

log = logging.getLogger(__name__)

KIND = "opcua_readings"
_OPEN_ORDERS = 10  # open work orders of one asset that get the reading


@dataclass(frozen=True)
class OpcuaReadingsConfig:
    endpoint: str  # opc.tcp://host:port/path
    nodes: Mapping[str, str]  # node id -> asset id
    interval_ms: int = 1000  # the subscription's publishing interval
    dataset: str = "assets"
    asset_key: str = "id"  # the field of an asset row that holds its id
    watchdog_ms: int = 1000
    reconnect_max_s: float = 30.0

    @classmethod
    def from_table(cls, table: Table) -> OpcuaReadingsConfig:
        endpoint = table.url("endpoint", ("opc.tcp",))
        nodes = table.table("nodes")
        ids = nodes.keys()
        if not ids:
            raise table.error("nodes", "must map at least one node id to an asset id")
        canonical = {}
        for node in ids:
            try:
                # As the server's notifications name it (`i=5` and `ns=0;i=5` are one node).
                canonical[node] = ua.NodeId.from_string(node).to_string()
            except Exception:  # asyncua raises several kinds for a bad id
                raise nodes.error(node, "is not an OPC UA node id (ns=2;s=Pump1.Counter)") from None
        return cls(
            endpoint=endpoint,
            nodes={canonical[node]: nodes.text(node) for node in ids},
            interval_ms=table.integer("interval_ms", cls.interval_ms, minimum=10),
            dataset=table.text("dataset", cls.dataset),
            asset_key=table.text("asset_key", cls.asset_key),
            watchdog_ms=table.integer("watchdog_ms", cls.watchdog_ms, minimum=100),
            reconnect_max_s=table.number("reconnect_max_s", cls.reconnect_max_s, minimum=0.1),
        )


def opcua_readings(name: str, table: Table, context: AdapterContext) -> OpcuaReadings:
    """The `opcua_readings` kind's factory (`KINDS`): it needs the write path and the index."""
    config = OpcuaReadingsConfig.from_table(table)
    if context.writer is None or context.screens is None:
        raise table.error(None, "opcua_readings writes meter readings: it needs the write path")
    return OpcuaReadings(name, config, context.writer, context.reference, context.screens)


@dataclass(frozen=True, slots=True)
class _Reading:
    value: Any
    at: float  # epoch seconds: the source's timestamp, else when it arrived


class OpcuaReadings:
    """The `Adapter` of kind `opcua_readings`. It keeps no state of its own: the reference row
    holds the last reading of each asset."""

    kind = KIND

    def __init__(
        self,
        name: str,
        config: OpcuaReadingsConfig,
        writer: DocumentWriter,
        reference: ReferenceStore,
        screens: Screens,
    ) -> None:
        self.name = name
        self.config = config
        self.origin = Origin(OriginKind.ADAPTER, name)
        self._writer = writer
        self._reference = reference
        self._screens = screens
        self._backoff = Backoff(base=0.5, cap=config.reconnect_max_s)
        self._pending: dict[str, _Reading] = {}  # node id -> its latest value, not yet applied
        self._arrived = asyncio.Event()
        self._applying = asyncio.Lock()  # held while readings are being recorded
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._refused: dict[str, str] = {}  # node id -> the server's status code for it
        self._last_error: str | None = None
        self._lost_at: float | None = None  # when the connection was lost, until readings resume
        self._counts: dict[str, float] = {
            "messages_in": 0,  # data changes received
            "effects": 0,  # readings recorded (reference rows and work-order entries)
            "readings": 0,
            "work_order_entries": 0,
            "bad_values": 0,
            "backwards": 0,
            "unknown_assets": 0,
            "errors": 0,
            "reconnects": 0,
            "gaps": 0,
            "last_gap_s": 0.0,
            "lag_s": 0.0,
        }

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._connection(), name=f"adapter-{self.name}"),
            asyncio.create_task(self._apply_loop(), name=f"adapter-{self.name}-apply"),
        ]

    async def stop(self, grace: float = 10.0) -> None:
        """Disconnect, let the readings in hand be recorded, then record what has arrived
        meanwhile (at most one value per node)."""
        connection, applying = self._tasks or (None, None)
        self._tasks = []
        if connection is not None:
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection
        self._connected = False
        if applying is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace), self._applying:
                applying.cancel()
        applying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await applying
        try:
            await self._apply_pending()
        except Exception:
            log.exception("adapter %s: the last readings could not be recorded", self.name)

    def health(self) -> Health:
        where = redact_url(self.config.endpoint)
        if self._connected and self._refused:
            node, code = next(iter(self._refused.items()))
            subscribed = len(self.config.nodes) - len(self._refused)
            detail = f"subscribed to {subscribed} of {len(self.config.nodes)} node(s)"
            return Health(HealthState.DEGRADED, f"{detail}; refused: {node} ({code})")
        if self._connected:
            return Health(HealthState.OK, f"subscribed to {len(self.config.nodes)} node(s)")
        if self._last_error is not None:
            return Health(HealthState.DEGRADED, f"{where}: {self._last_error}; reconnecting")
        return Health(HealthState.DEGRADED, f"connecting to {where}")

    def metrics(self) -> Mapping[str, float]:
        return dict(self._counts)

    # --- the connection and its watchdog ---------------------------------------------------

    async def _connection(self) -> None:
        failures = 0
        while True:
            client = Client(self.config.endpoint, timeout=4)
            try:
                await client.connect()
                try:
                    subscription = await client.create_subscription(self.config.interval_ms, self)
                    nodes = [client.get_node(node) for node in self.config.nodes]
                    # A list in, a list out: a handle, or the StatusCode of a node refused.
                    results = await subscription.subscribe_data_change(list(nodes))
                    assert isinstance(results, list)
                    self._refused = {
                        node: result.name
                        for node, result in zip(self.config.nodes, results, strict=True)
                        if isinstance(result, ua.StatusCode)
                    }
                    for node, code in self._refused.items():
                        log.warning("adapter %s: node %s refused: %s", self.name, node, code)
                    self._connected, self._last_error, failures = True, None, 0
                    log.info("adapter %s: subscribed to %d node(s)", self.name, len(nodes))
                    await self._watch(client)
                finally:
                    self._connected = False
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.disconnect(), 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever the transport raises: the watchdog's business
                self._last_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self._lost_at is None:
                self._lost_at = time.time()
            failures += 1
            self._counts["errors"] += 1
            self._counts["reconnects"] += 1
            delay = self._backoff.delay(failures, None, random.random())
            log.warning(
                "adapter %s: %s: %s; reconnecting in %.1f s",
                self.name,
                redact_url(self.config.endpoint),
                self._last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _watch(self, client: Client) -> None:
        """Return (raise) when the server stops answering: its state is read every
        `watchdog_ms`, each read given as long to answer."""
        period = self.config.watchdog_ms / 1000
        while True:
            await asyncio.sleep(period)
            await asyncio.wait_for(client.nodes.server_state.read_value(), period * 2)

    # --- data changes ----------------------------------------------------------------------

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        """asyncua's subscription handler: keep the node's latest value for the apply loop."""
        self._counts["messages_in"] += 1
        source = data.monitored_item.Value.SourceTimestamp
        at = source.replace(tzinfo=source.tzinfo or dt.UTC).timestamp() if source else time.time()
        self._pending[node.nodeid.to_string()] = _Reading(val, at)
        self._arrived.set()

    def status_change_notification(self, status: Any) -> None:
        log.warning("adapter %s: the subscription's status changed: %s", self.name, status)

    async def _apply_loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            try:
                async with self._applying:
                    await self._apply_pending()
            except Exception:
                self._counts["errors"] += 1
                log.exception("adapter %s: readings could not be applied", self.name)

    async def _apply_pending(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        if self._lost_at is not None:
            gap = time.time() - self._lost_at
            self._lost_at = None
            self._counts["gaps"] += 1
            self._counts["last_gap_s"] = gap
            log.warning("adapter %s: readings resumed after a gap of %.1f s", self.name, gap)
        readings: dict[str, _Reading] = {}
        for node, reading in pending.items():
            asset = self.config.nodes.get(node)
            if asset is None:
                continue
            value = reading.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                self._bad(node, f"not a number ({type(value).__name__})")
            elif not math.isfinite(value):
                self._bad(node, f"not a finite number ({value})")
            else:
                readings[asset] = reading
        if not readings:
            return
        rows = await self._reference.rows(self.config.dataset, readings)
        changed = []
        for asset, reading in readings.items():
            row = rows.get(asset)
            if row is None:
                self._counts["unknown_assets"] += 1
                log.warning("adapter %s: no asset %r in %s", self.name, asset, self.config.dataset)
                continue
            before = row.get("meter_reading")
            if isinstance(before, int | float) and reading.value < before:
                self._counts["backwards"] += 1
                log.warning(
                    "adapter %s: %s's counter went backwards (%s after %s): not recorded",
                    self.name,
                    asset,
                    reading.value,
                    before,
                )
                continue
            if reading.value == before:
                continue
            at = dt.datetime.fromtimestamp(reading.at, dt.UTC).isoformat()
            row = {**row, self.config.asset_key: asset, "meter_reading": reading.value}
            changed.append((asset, reading, {**row, "meter_at": at}))
        if not changed:
            return
        rows_changed = [row for _, _, row in changed]
        key = self.config.asset_key
        await self._reference.import_rows(self.config.dataset, rows_changed, key=key, full=False)
        self._counts["effects"] += len(changed)
        await asyncio.gather(*(self._log_on_orders(asset, r) for asset, r, _ in changed))
        self._counts["readings"] += len(changed)  # recorded wherever they go
        self._counts["lag_s"] = max(time.time() - max(r.at for _, r, _ in changed), 0.0)

    async def _log_on_orders(self, asset: str, reading: _Reading) -> None:
        """The reading as an entry of the asset's open work orders' `meter_readings`."""
        at = dt.datetime.fromtimestamp(reading.at, dt.UTC).isoformat()
        by = str(self.origin)

        def record(doc: Doc[Any]) -> None:
            work_order.record_meter_reading(doc, reading.value, by=by, at=at)

        for doc_id in await self._screens.open_work_orders(asset, _OPEN_ORDERS):
            try:
                seq = await self._writer.edit(doc_id, record, self.origin)
            except FieldsyncError as exc:  # refused: counted and logged, the next one is tried
                self._counts["errors"] += 1
                log.warning("adapter %s: %s refused the reading: %s", self.name, doc_id, exc)
                continue
            self._counts["work_order_entries"] += seq is not None
            self._counts["effects"] += seq is not None

    def _bad(self, node: str, reason: str) -> None:
        self._counts["bad_values"] += 1
        log.warning("adapter %s: node %s: %s: not recorded", self.name, node, reason)
