"""`mqtt_alarms`: plant alarms published on an MQTT broker become work orders.

The adapter subscribes with QoS 1 in a persistent session (MQTT 5, clean start off, a session
expiry), so the broker keeps what is published while fieldsync is down and delivers it when the
adapter comes back; each message is acknowledged (PUBACK) only once its effect is committed, so
a crash loses nothing: the broker sends again what was not acknowledged.

An active alarm at or above `min_severity` opens a work order for its asset (team, region and
site from the asset's reference row); while that work order is open, repeats of the same
(asset, alarm) count on it (`fields.alarm_count`, `fields.alarm_last_at`) and a `cleared` adds
a line to its notes; once it is completed, closed or cancelled, the next alarm opens another.

Which work order is open for an (asset, alarm) is remembered in the adapter's state file: the
alarm name is not in the document index, and the adapter made every such work order, so its own
map (checked against the document's status when an alarm arrives) is the simplest exact answer.

Exactly once per message id: ids already applied are remembered (bounded, `remember_ids`); an
edit is preceded by an intent (the document, a marker written into it, the message ids), so
after a crash between the document's commit and the state file's, the marker in the document
tells whether the edit happened, and the redelivered messages are recognised either way.

Flow control: the broker sends at most `in_flight` unacknowledged messages (MQTT 5 Receive
Maximum), so what waits here is bounded by `in_flight` x `max_message_bytes`; what is waiting
is taken as one batch, repeats of one (asset, alarm) coalesced into one edit, different work
orders written concurrently (one group commit), then acknowledged together. Beyond the window,
a flood waits at the broker (within its own queue limit), not in fieldsync's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pycrdt import Doc, Map, Text

from fieldsync.adapters._base import DocumentWriter, Health, HealthState
from fieldsync.adapters._config import AdapterContext, Table, redact_url
from fieldsync.adapters._inbound import StateFile
from fieldsync.adapters._runner import Backoff
from fieldsync.documents import work_order
from fieldsync.errors import FieldsyncError
from fieldsync.records import Origin, OriginKind
from fieldsync.replication import SERVICE_ROLE
from fieldsync.storage import ReferenceStore

__all__ = ["Alarm", "BadAlarm", "MqttAlarms", "MqttAlarmsConfig", "mqtt_alarms", "parse_alarm"]

log = logging.getLogger(__name__)

KIND = "mqtt_alarms"
# Severity -> priority: the highest priority whose minimum the severity reaches. The scale is
# OPC UA Alarms & Conditions' (1-1000, higher is worse), which most plant alarm sources follow.
DEFAULT_PRIORITIES: Mapping[str, int] = {"urgent": 800, "high": 500, "normal": 0}
CLOSED_STATUSES = frozenset({"completed", "closed", "cancelled"})
_MAX_ID = 128
_MAX_TEXT = 2000
_KEPT_PAYLOAD = 512  # bytes of a rejected payload kept for inspection

_SCHEMA = (
    # Message ids applied (or set aside), oldest first, bounded.
    "CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE)",
    # The work order each (asset, alarm) last opened.
    """CREATE TABLE IF NOT EXISTS open_orders (
        asset TEXT NOT NULL, alarm TEXT NOT NULL, doc TEXT NOT NULL,
        PRIMARY KEY (asset, alarm))""",
    # An edit in hand: its document, the marker it writes there and the messages it applies.
    """CREATE TABLE IF NOT EXISTS intents (
        doc TEXT PRIMARY KEY, asset TEXT NOT NULL, alarm TEXT NOT NULL,
        marker TEXT NOT NULL, ids TEXT NOT NULL)""",
    # Messages set aside (malformed, unknown asset, oversized, refused), newest last, bounded.
    """CREATE TABLE IF NOT EXISTS rejected (
        n INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL,
        reason TEXT NOT NULL, payload TEXT NOT NULL)""",
)


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttAlarmsConfig:
    url: str  # mqtt://host:port (user:password@ allowed)
    topics: tuple[str, ...]
    min_severity: int
    client_id: str
    dataset: str = "assets"
    priorities: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PRIORITIES))
    # MQTT 5 Receive Maximum: the unacknowledged messages the broker may send, which bounds
    # what waits here (in_flight x max_message_bytes: 40 MiB at most, a few MiB of real alarms).
    # What arrives faster than that is queued by the broker, up to its own limit (Mosquitto:
    # max_queued_messages, 1000 by default), beyond which it drops: sized for a 10,000 burst.
    in_flight: int = 10_000
    max_message_bytes: int = 4096
    session_expiry_s: int = 7 * 86400  # how long the broker keeps the session while we are away
    remember_ids: int = 100_000
    keep_rejected: int = 1000

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 1883

    @classmethod
    def from_table(cls, name: str, table: Table) -> MqttAlarmsConfig:
        url = table.url("url", ("mqtt",))
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise table.error("url", "has a bad port") from None
        if not parts.hostname:
            raise table.error("url", "names no host (mqtt://host:port)")
        topics = table.texts("topics")
        if not topics:
            raise table.error("topics", "must name at least one topic filter")
        for topic in topics:
            problem = _filter_problem(topic)
            if problem:
                raise table.error("topics", f"{topic!r}: {problem}")
        priorities = table.table("priorities", optional=True)
        names = priorities.keys()
        return cls(
            url=url,
            topics=topics,
            min_severity=table.integer("min_severity"),
            client_id=table.text("client_id", f"fieldsync-{name}"),
            dataset=table.text("dataset", cls.dataset),
            priorities={n: priorities.integer(n) for n in names} or dict(DEFAULT_PRIORITIES),
            in_flight=table.integer("in_flight", cls.in_flight, minimum=1, maximum=65535),
            max_message_bytes=table.integer(
                "max_message_bytes", cls.max_message_bytes, minimum=256
            ),
            session_expiry_s=table.integer(
                "session_expiry_s", cls.session_expiry_s, minimum=60, maximum=2**32 - 1
            ),
            remember_ids=table.integer("remember_ids", cls.remember_ids, minimum=1000),
            keep_rejected=table.integer("keep_rejected", cls.keep_rejected, minimum=1),
        )

    def priority(self, severity: int) -> str | None:
        reached = [
            (minimum, name) for name, minimum in self.priorities.items() if severity >= minimum
        ]
        return max(reached)[1] if reached else None


def _filter_problem(topic: str) -> str | None:
    """What makes `topic` no MQTT topic filter (MQTT 5 §4.7), None when it is one."""
    levels = topic.split("/")
    for at, level in enumerate(levels):
        if "#" in level and (level != "#" or at != len(levels) - 1):
            return "`#` must be a whole level, the last one"
        if "+" in level and level != "+":
            return "`+` must be a whole level"
    return None


def mqtt_alarms(name: str, table: Table, context: AdapterContext) -> MqttAlarms:
    """The `mqtt_alarms` kind's factory (`KINDS`): it needs the write path."""
    config = MqttAlarmsConfig.from_table(name, table)
    if context.writer is None:
        raise table.error(None, "mqtt_alarms writes work orders: it needs the write path")
    return MqttAlarms(
        name, config, context.writer, context.reference, context.data_dir / "adapters"
    )


# --- the payload -----------------------------------------------------------------------------


class BadAlarm(ValueError):
    """A payload that is not an alarm; the message says why."""


@dataclass(frozen=True, slots=True)
class Alarm:
    id: str
    asset_id: str
    alarm: str
    severity: int
    state: str  # "active" or "cleared"
    at: str  # ISO 8601, as published
    message: str

    @property
    def epoch(self) -> float:
        return _epoch(self.at)


def parse_alarm(payload: bytes) -> Alarm:
    """The alarm in a message's payload (the README's schema); raises `BadAlarm`."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadAlarm("not JSON") from None
    if not isinstance(data, dict):
        raise BadAlarm("not a JSON object")
    texts = {}
    for key, limit in (("id", _MAX_ID), ("asset_id", 256), ("alarm", _MAX_ID)):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            raise BadAlarm(f"`{key}` must be text of 1-{limit} characters")
        texts[key] = value
    severity = data.get("severity")
    if isinstance(severity, bool) or not isinstance(severity, int):
        raise BadAlarm("`severity` must be an integer")
    state = data.get("state")
    if state not in ("active", "cleared"):
        raise BadAlarm('`state` must be "active" or "cleared"')
    at = data.get("at")
    if not isinstance(at, str):
        raise BadAlarm("`at` must be an ISO 8601 time")
    try:
        _epoch(at)
    except ValueError:
        raise BadAlarm("`at` must be an ISO 8601 time") from None
    message = data.get("message", "")
    if not isinstance(message, str) or len(message) > _MAX_TEXT:
        raise BadAlarm(f"`message` must be text of at most {_MAX_TEXT} characters")
    return Alarm(texts["id"], texts["asset_id"], texts["alarm"], severity, state, at, message)


def _epoch(at: str) -> float:
    moment = dt.datetime.fromisoformat(at)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)  # a plant clock without an offset is UTC
    return moment.timestamp()


# --- the adapter -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """One (asset, alarm)'s edit from a batch: what its messages add to one work order."""

    doc: str | None = None  # the open work order, or the one created (None: nothing to do)
    create: Alarm | None = None
    count: int = 0
    last: Alarm | None = None
    severity: int | None = None
    state: str = "active"  # of the latest message that had an effect
    notes: list[str] = field(default_factory=list)


class MqttAlarms:
    """The `Adapter` of kind `mqtt_alarms`. `state_dir` holds its state file."""

    kind = KIND

    def __init__(
        self,
        name: str,
        config: MqttAlarmsConfig,
        writer: DocumentWriter,
        reference: ReferenceStore,
        state_dir: Path,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.origin = Origin(OriginKind.ADAPTER, name)
        self._writer = writer
        self._reference = reference
        self._state = StateFile(state_dir / f"{name}.sqlite", _SCHEMA)
        self._backoff = backoff or Backoff(base=0.5, cap=30.0)
        self._task: asyncio.Task[None] | None = None
        self._handling = asyncio.Lock()  # held while a batch is being applied
        self._connected = False
        self._last_error: str | None = None
        self._last_reject = ""  # the reason the latest message was set aside
        self._counts: dict[str, float] = {
            "messages_in": 0,
            "settled": 0,  # messages applied, found duplicate or set aside, and acknowledged
            "effects": 0,
            "work_orders_opened": 0,
            "duplicates": 0,
            "coalesced": 0,
            "below_severity": 0,
            "rejected": 0,
            "rejected_malformed": 0,
            "rejected_unknown_asset": 0,
            "rejected_oversized": 0,
            "rejected_refused": 0,
            "errors": 0,
            "reconnects": 0,
            "batch_peak": 0,
            "lag_s": 0.0,
        }

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._state.open()
        self._task = asyncio.create_task(self._run(), name=f"adapter-{self.name}")

    async def stop(self, grace: float = 10.0) -> None:
        """Let the batch in hand commit (its messages are then acknowledged), then disconnect;
        what was received and not applied stays unacknowledged, and the broker sends it again."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace), self._handling:
                    task.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected = False
        await self._state.close()

    def health(self) -> Health:
        where = redact_url(self.config.url)
        if self._connected:
            rejected = int(self._counts["rejected"])
            kept = f"; {rejected} message(s) set aside, latest: {self._last_reject}"
            return Health(HealthState.OK, f"subscribed at {where}" + (kept if rejected else ""))
        if self._last_error is not None:
            return Health(HealthState.DEGRADED, f"{where}: {self._last_error}; reconnecting")
        return Health(HealthState.DEGRADED, f"connecting to {where}")

    def metrics(self) -> Mapping[str, float]:
        return dict(self._counts)

    async def rejected(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest messages set aside, newest first: when, topic, reason, payload (its first
        bytes, as text)."""

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT at, topic, reason, payload FROM rejected ORDER BY n DESC LIMIT ?",
                (limit,),
            )
            return [
                dict(zip(("at", "topic", "reason", "payload"), row, strict=True)) for row in rows
            ]

        return await self._state.run(read)

    # --- the connection --------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
        connect.SessionExpiryInterval = self.config.session_expiry_s
        connect.ReceiveMaximum = self.config.in_flight
        parts = urlsplit(self.config.url)
        client = aiomqtt.Client(
            self.config.host,
            self.config.port,
            username=parts.username,
            password=parts.password,
            identifier=self.config.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,  # the persistent session: what was queued while away arrives
            properties=connect,
            timeout=10,
        )
        # aiomqtt has no acknowledgement API of its own yet (empicano/aiomqtt#345): paho's
        # manual acks, through its client, so a PUBACK goes out only after the commit.
        client._client.manual_ack_set(True)
        return client

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with self._client() as client:
                    # Edits a failure left in hand are settled before their messages come again.
                    await self._recover()
                    await client.subscribe([(topic, 1) for topic in self.config.topics])
                    self._connected, self._last_error, failures = True, None, 0
                    log.info(
                        "adapter %s: subscribed to %s", self.name, ", ".join(self.config.topics)
                    )
                    await self._consume(client)
            except aiomqtt.MqttError as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
            except _Retry as exc:
                self._last_error = str(exc)
            except Exception as exc:  # the state file, the store: never the end of the adapter
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("adapter %s: unexpected failure", self.name)
            self._connected = False
            failures += 1
            self._counts["errors"] += 1
            self._counts["reconnects"] += 1
            delay = self._backoff.delay(failures, None, random.random())
            log.warning(
                "adapter %s: %s; reconnecting in %.1f s", self.name, self._last_error, delay
            )
            await asyncio.sleep(delay)

    async def _consume(self, client: aiomqtt.Client) -> None:
        messages = client.messages
        while True:
            batch = [await anext(messages)]
            # Everything already waiting joins the batch; the broker's Receive Maximum bounds it.
            while len(messages) and len(batch) < self.config.in_flight:
                batch.append(await anext(messages))
            async with self._handling:
                await self._handle(batch)
                for message in batch:
                    if message.qos:
                        client._client.ack(message.mid, message.qos)
                self._counts["settled"] += len(batch)

    # --- a batch ---------------------------------------------------------------------------

    async def _handle(self, batch: list[aiomqtt.Message]) -> None:
        """Apply a batch; every message in it is settled (applied, a duplicate, or set aside)
        when this returns. Raises `_Retry` when the write path failed for a reason of its own
        (not a refusal): the batch is then left unacknowledged, to come again."""
        self._counts["messages_in"] += len(batch)
        self._counts["batch_peak"] = max(self._counts["batch_peak"], len(batch))
        alarms: list[Alarm] = []
        topics: dict[str, str] = {}  # message id -> its topic, for what is set aside
        rejects: list[tuple[str, str, bytes]] = []
        for message in batch:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            topic = str(message.topic)
            if len(payload) > self.config.max_message_bytes:
                reason = (
                    f"oversized: {len(payload)} bytes (at most {self.config.max_message_bytes})"
                )
                rejects.append((topic, reason, payload))
                self._counts["rejected_oversized"] += 1
                continue
            try:
                alarm = parse_alarm(payload)
            except BadAlarm as exc:
                rejects.append((topic, f"malformed: {exc}", payload))
                self._counts["rejected_malformed"] += 1
                continue
            alarms.append(alarm)
            topics[alarm.id] = topic
        seen = await self._state.run(partial(_seen, [a.id for a in alarms]))
        fresh: list[Alarm] = []
        for alarm in alarms:
            if alarm.id in seen:
                self._counts["duplicates"] += 1
            else:
                seen.add(alarm.id)
                fresh.append(alarm)
        assets = await self._reference.rows(self.config.dataset, {a.asset_id for a in fresh})
        groups: dict[tuple[str, str], list[Alarm]] = {}
        unknown: list[str] = []
        for alarm in fresh:
            if alarm.asset_id not in assets:
                reason = f"unknown asset {alarm.asset_id!r} (not in {self.config.dataset})"
                rejects.append((topics[alarm.id], reason, _alarm_payload(alarm)))
                unknown.append(alarm.id)
                self._counts["rejected_unknown_asset"] += 1
                continue
            groups.setdefault((alarm.asset_id, alarm.alarm), []).append(alarm)
        await self._apply(groups, assets, topics, rejects, unknown)

    async def _apply(
        self,
        groups: dict[tuple[str, str], list[Alarm]],
        assets: Mapping[str, Mapping[str, Any]],
        topics: Mapping[str, str],
        rejects: list[tuple[str, str, bytes]],
        set_aside: list[str],
    ) -> None:
        """Each (asset, alarm)'s messages as one edit of its work order, the edits of different
        work orders concurrently: the intents in one transaction of the state file, the edits
        in the store's group commits, what they settled in one more transaction."""
        opened = await self._open_orders(list(groups))
        plans = {key: self._plan(opened.get(key), group) for key, group in groups.items()}
        bound = self.config.remember_ids
        intents: dict[tuple[str, str], tuple[str, str, str, str, str]] = {}
        idle: list[str] = []  # ids of messages that had nothing to do (remembered as seen)
        for key, plan in plans.items():
            ids = [a.id for a in groups[key]]
            if plan.doc is None:
                idle += ids
            else:
                intents[key] = (plan.doc, *key, ids[-1], orjson.dumps(ids).decode())
        await self._state.run(partial(_intend, list(intents.values()), idle, bound))
        results = await asyncio.gather(
            *(
                self._writer.edit(doc, self._change(plans[k], assets[k[0]], marker), self.origin)
                for k, (doc, _, _, marker, _) in intents.items()
            ),
            return_exceptions=True,
        )
        committed, refused = [], []
        retry: BaseException | None = None
        for (key, intent), result in zip(intents.items(), results, strict=True):
            plan = plans[key]
            if isinstance(result, FieldsyncError):  # the write path refused: set aside
                reason = f"refused: {type(result).__name__}: {result}"
                rejects += [(topics[a.id], reason, _alarm_payload(a)) for a in groups[key]]
                set_aside += [a.id for a in groups[key]]
                refused.append(intent)
                self._counts["rejected_refused"] += len(groups[key])
            elif isinstance(result, BaseException):
                retry = result  # its intent stays: the next connection settles it
                log.warning("adapter %s: %s/%s failed: %r", self.name, *key, result)
            else:
                committed.append(intent)
                self._counts["effects"] += result is not None
                self._counts["work_orders_opened"] += plan.create is not None
                self._counts["coalesced"] += max(plan.count - 1, 0)
                if plan.last is not None:
                    self._counts["lag_s"] = max(time.time() - plan.last.epoch, 0.0)
        self._counts["rejected"] += len(rejects)
        if rejects:
            self._last_reject = rejects[-1][1]
        for _, reason, _ in rejects[:5]:
            log.warning("adapter %s: message set aside: %s", self.name, reason)
        await self._state.run(
            partial(
                _settle, committed, refused, rejects, set_aside, self.config.keep_rejected, bound
            )
        )
        if retry is not None:
            raise _Retry(f"the write path failed: {type(retry).__name__}: {retry}")

    def _plan(self, doc: str | None, group: list[Alarm]) -> _Plan:
        """What one (asset, alarm)'s messages do to `doc`, its open work order (None: none is
        open, and the first alarm at or above `min_severity` opens one)."""
        plan = _Plan(doc=doc)
        for alarm in group:
            if alarm.state == "active":
                if alarm.severity < self.config.min_severity:
                    self._counts["below_severity"] += 1
                    continue
                if plan.doc is None:
                    plan.doc, plan.create = self._new_doc_id(alarm), alarm
                plan.count += 1
                plan.state = "active"
                plan.severity = max(plan.severity or alarm.severity, alarm.severity)
                if plan.last is None or alarm.epoch >= plan.last.epoch:
                    plan.last = alarm
            elif plan.doc is not None:
                plan.notes.append(f"{alarm.at} cleared: {alarm.message}".rstrip(": ") + "\n")
                plan.state = "cleared"
        return plan

    async def _open_orders(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The work order each (asset, alarm) last opened, where it is still open."""

        def read(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
            found = {}
            for key in keys:
                row = conn.execute(
                    "SELECT doc FROM open_orders WHERE asset = ? AND alarm = ?", key
                ).fetchone()
                if row is not None:
                    found[key] = row[0]
            return found

        remembered = await self._state.run(read)
        documents = await asyncio.gather(*(self._writer.read(d) for d in remembered.values()))
        return {
            key: doc
            for (key, doc), document in zip(remembered.items(), documents, strict=True)
            if document is not None
            and ((document.get("fields") or {}).get("status")) not in CLOSED_STATUSES
        }

    def _new_doc_id(self, alarm: Alarm) -> str:
        # Named after the message that opens it: the same message always names the same work
        # order, whichever run of the adapter applies it.
        digest = hashlib.sha256(f"{self.name}\0{alarm.id}".encode()).hexdigest()[:20]
        return f"wo:alarm-{digest}"

    def _change(
        self, plan: _Plan, asset: Mapping[str, Any], marker: str
    ) -> Callable[[Doc[Any]], None]:
        by = str(self.origin)
        config = self.config

        def change(doc: Doc[Any]) -> None:
            fields = doc.get("fields", type=Map)
            if plan.create is not None and not fields:
                alarm = plan.create
                priority = config.priority(plan.severity or alarm.severity)
                opened = {
                    "title": f"{alarm.alarm} on {alarm.asset_id}",
                    "description": alarm.message,
                    "status": "new",
                    **({"priority": priority} if priority else {}),
                    "asset_id": alarm.asset_id,
                    **{k: asset.get(k) for k in ("team", "region", "site") if asset.get(k)},
                    "alarm": alarm.alarm,
                    "alarm_severity": plan.severity,
                    "alarm_count": 0,
                    "alarm_first_at": alarm.at,
                }
                line = f"{alarm.at} active (severity {alarm.severity}): {alarm.message}"
                work_order.write(
                    doc, opened, notes=line.rstrip(": ") + "\n", by=by, role=SERVICE_ROLE
                )
            with doc.transaction():
                if plan.count:
                    fields["alarm_count"] = int(fields.get("alarm_count") or 0) + plan.count
                    if plan.severity is not None:
                        fields["alarm_severity"] = max(
                            int(fields.get("alarm_severity") or 0), plan.severity
                        )
                if plan.last is not None:
                    fields["alarm_last_at"] = plan.last.at
                if plan.notes:
                    notes = doc.get("notes", type=Text)
                    notes.insert(len(notes), "".join(plan.notes))
                fields["alarm_state"] = plan.state
                fields["alarm_last_id"] = marker  # tells a restart whether this edit committed

        return change

    # --- recovery --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Settle the edits a crash left in hand: one whose marker is in its document committed
        (its messages are applied, and remembered as such); the others did not (their messages,
        unacknowledged, come again)."""
        intents = await self._state.run(
            lambda conn: conn.execute(
                "SELECT doc, asset, alarm, marker, ids FROM intents"
            ).fetchall()
        )
        for intent in intents:
            document = await self._writer.read(intent[0])
            marker = ((document or {}).get("fields") or {}).get("alarm_last_id")
            ids = orjson.loads(intent[4]) if marker == intent[3] else []
            await self._state.run(partial(_done, ids, tuple(intent), self.config.remember_ids))
            log.info(
                "adapter %s: an edit of %s in hand at the last stop %s",
                self.name,
                intent[0],
                "had committed" if ids else "had not committed: its messages come again",
            )


class _Retry(Exception):
    """The batch could not be applied for a reason of the server's: reconnect and take it again."""


def _alarm_payload(alarm: Alarm) -> bytes:
    return orjson.dumps(
        {
            k: getattr(alarm, k)
            for k in ("id", "asset_id", "alarm", "severity", "state", "at", "message")
        }
    )


# --- the state file (each on its thread, in one transaction) ---------------------------------


def _seen(ids: list[str], conn: sqlite3.Connection) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        found.update(i for (i,) in conn.execute(f"SELECT id FROM seen WHERE id IN ({marks})", part))
    return found


def _remember(ids: Iterable[str], bound: int, conn: sqlite3.Connection) -> None:
    conn.executemany("INSERT OR IGNORE INTO seen (id) VALUES (?)", [(i,) for i in ids])
    conn.execute("DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (bound,))


def _intend(
    intents: list[tuple[str, str, str, str, str]],
    idle: list[str],
    bound: int,
    conn: sqlite3.Connection,
) -> None:
    conn.executemany("INSERT OR REPLACE INTO intents VALUES (?, ?, ?, ?, ?)", intents)
    _remember(idle, bound, conn)


def _settle(
    committed: list[tuple[str, str, str, str, str]],
    refused: list[tuple[str, str, str, str, str]],
    rejects: list[tuple[str, str, bytes]],
    set_aside: list[str],
    keep: int,
    bound: int,
    conn: sqlite3.Connection,
) -> None:
    """What a batch settled: the messages of committed edits are applied (and their work orders
    the open ones of their (asset, alarm)); refused edits and rejected messages are set aside."""
    for intent in committed:
        _done(orjson.loads(intent[4]), intent, bound, conn)
    for intent in refused:
        _done([], intent, bound, conn)
    _set_aside(rejects, set_aside, keep, bound, conn)


def _done(
    ids: list[str], intent: tuple[Any, ...] | None, bound: int, conn: sqlite3.Connection
) -> None:
    """The messages `ids` are applied (the edit of `intent`, if any, committed)."""
    _remember(ids, bound, conn)
    if intent is not None:
        doc, asset, alarm = intent[:3]
        conn.execute("DELETE FROM intents WHERE doc = ?", (doc,))
        if ids:
            conn.execute(
                "INSERT OR REPLACE INTO open_orders (asset, alarm, doc) VALUES (?, ?, ?)",
                (asset, alarm, doc),
            )


def _set_aside(
    rejects: list[tuple[str, str, bytes]],
    ids: list[str],
    keep: int,
    bound: int,
    conn: sqlite3.Connection,
) -> None:
    """Keep the rejected messages for inspection (the latest `keep`), and remember the ids of
    those that had one, so a redelivery is not set aside twice."""
    now = time.time()
    conn.executemany(
        "INSERT INTO rejected (at, topic, reason, payload) VALUES (?, ?, ?, ?)",
        [
            (now, topic, reason, payload[:_KEPT_PAYLOAD].decode("utf-8", "replace"))
            for topic, reason, payload in rejects
        ],
    )
    conn.execute("DELETE FROM rejected WHERE n <= (SELECT max(n) FROM rejected) - ?", (keep,))
    _remember(ids, bound, conn)
