"""`erp_http`: work orders written to an ERP's HTTP API (REST/OData style), the ERP's answer
written back into the document.

Each delivery is one create (`POST`) or update (`PATCH`) of the order, carrying the delivery's
key as `Idempotency-Key`, so a retry after a lost answer has the ERP replay its first answer
instead of acting twice. An order the ERP already holds under the document's id (created by an
answer that was lost, then coalesced into a later delivery) is found by the ERP's duplicate
refusal and updated instead. Timeouts, lost connections, 5xx and 429 are retried by the outbox
(`Retry-After` honoured); other 4xx are the ERP refusing the data, dead-lettered with its message.
A circuit breaker stops calling an ERP that keeps failing and probes it after a cool-down.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import orjson
from pycrdt import Doc, Map
from yarl import URL

from fieldsync.adapters._base import (
    Delivery,
    DeliveryError,
    DocumentWriter,
    Health,
    HealthState,
)
from fieldsync.adapters._config import DEFAULT_MAX_ATTEMPTS, AdapterContext, Table
from fieldsync.adapters._erp_mapping import ErpMapping, ProjectionError, read_mapping
from fieldsync.records import Origin, OriginKind

log = logging.getLogger(__name__)

KIND = "erp_http"
ORDERS = "api/v1/maintenance-orders"  # relative to base_url
# The body's key for each entity's rows.
BODY_KEYS = {
    "order": "order",
    "operation": "operations",
    "confirmation": "confirmations",
    "goods_issue": "goods_issues",
}


@dataclass(frozen=True, slots=True)
class ErpHttpConfig:
    base_url: URL
    mapping: ErpMapping
    timeout_s: float = 10.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    token: str | None = None  # sent as `Authorization: Bearer …`
    username: str | None = None  # with password: HTTP basic
    password: str | None = None
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0

    @classmethod
    def from_table(cls, table: Table) -> Self:
        base = URL(table.url("base_url", ("http", "https")))
        if not base.host:
            raise table.error("base_url", "names no host")
        if base.user is not None or base.password is not None:
            # Kept out of the URL, which error messages and health details may show.
            raise table.error("base_url", "credentials go in token, or username and password")
        if base.scheme == "http" and not _loopback(base.host):
            # Credentials and business data travel in it: plain HTTP only to this machine.
            raise table.error("base_url", "must be https:// unless the ERP is on loopback")
        token: str | None = table.secret("token", None)
        username: str | None = table.text("username", None)
        password: str | None = table.secret("password", None)
        if (username is None) != (password is None):
            raise table.error("password", "username and password go together")
        if token is not None and username is not None:
            raise table.error("token", "a token or a username and password, not both")
        return cls(
            base_url=base if base.path.endswith("/") else base.with_path(base.path + "/"),
            mapping=read_mapping(table),
            timeout_s=table.number("timeout_s", 10.0, minimum=0.001),
            max_attempts=table.max_attempts(),
            token=token,
            username=username,
            password=password,
            breaker_failures=table.integer("breaker_failures", 5, minimum=1),
            breaker_cooldown_s=table.number("breaker_cooldown_s", 30.0, minimum=0),
        )


def build(name: str, table: Table, context: AdapterContext) -> ErpHttpAdapter:
    """The `erp_http` kind's factory (`KINDS`): it needs the write path for the write-back."""
    config = ErpHttpConfig.from_table(table)
    if context.writer is None:
        raise table.error(
            "kind", "erp_http writes the ERP's answer into documents: no write path here"
        )
    return ErpHttpAdapter(name, config, context.writer)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls refused until the cool-down has passed
    HALF_OPEN = "half_open"  # one probe call in flight; its outcome closes or reopens


class CircuitBreaker:
    """Opens after `failures` failed calls in a row; after `cooldown_s` lets one probe through;
    the probe's success closes it, its failure opens it for another cool-down."""

    def __init__(
        self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.in_a_row = 0
        self.opened_at = 0.0

    def remaining(self) -> float:
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def enter(self) -> None:
        """Before a call: raises a retryable DeliveryError while the breaker refuses calls."""
        if self.state is BreakerState.OPEN and self.remaining() == 0:
            self.state = BreakerState.HALF_OPEN  # this caller is the probe
            return
        if self.state is not BreakerState.CLOSED:
            wait = self.remaining() if self.state is BreakerState.OPEN else self.cooldown_s
            raise DeliveryError(
                "erp_circuit_open",
                f"the ERP failed {self.in_a_row} times in a row; calls resume after a probe",
                retry_after=max(wait, 0.001),
            )

    def succeeded(self) -> None:
        self.state, self.in_a_row = BreakerState.CLOSED, 0

    def failed(self) -> None:
        self.in_a_row += 1
        if self.state is BreakerState.HALF_OPEN or self.in_a_row >= self.failures:
            self.state, self.opened_at = BreakerState.OPEN, self.clock()


@dataclass(frozen=True, slots=True)
class _Answer:
    number: str
    status: str


class _Duplicate(Exception):
    def __init__(self, number: str) -> None:
        self.number = number


class ErpHttpAdapter:
    """One `erp_http` adapter: delivers work orders to one ERP's API and writes its answer
    (`fields.erp_ref`, `fields.erp_status`) back into each document through `writer`."""

    kind = KIND
    doc_types = frozenset({"wo"})

    def __init__(
        self,
        name: str,
        config: ErpHttpConfig,
        writer: DocumentWriter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.max_attempts = config.max_attempts
        self.writer = writer
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s, clock)
        self._origin = Origin(OriginKind.ADAPTER, name)
        self._session: aiohttp.ClientSession | None = None
        self._last_error = ""
        self._counts = {
            "delivered": 0.0,
            "created": 0.0,
            "refused": 0.0,
            "failed": 0.0,
            "written_back": 0.0,
        }

    async def start(self) -> None:
        headers = {"Accept": "application/json"}
        if self.config.token is not None:
            headers["Authorization"] = f"Bearer {self.config.token}"
        auth = None
        if self.config.username is not None and self.config.password is not None:
            auth = aiohttp.BasicAuth(self.config.username, self.config.password)
        self._session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def health(self) -> Health:
        breaker = self.breaker
        if breaker.state is BreakerState.OPEN:
            return Health(
                HealthState.DOWN,
                f"circuit open after {breaker.in_a_row} failures in a row; probe in "
                f"{breaker.remaining():.0f} s; last: {self._last_error}",
            )
        if breaker.state is BreakerState.HALF_OPEN:
            return Health(HealthState.DEGRADED, "circuit half-open: probing the ERP")
        if breaker.in_a_row:
            return Health(
                HealthState.DEGRADED,
                f"{breaker.in_a_row} failures in a row; last: {self._last_error}",
            )
        return Health(HealthState.OK)

    def metrics(self) -> Mapping[str, float]:
        return {
            **self._counts,
            "failures_in_a_row": float(self.breaker.in_a_row),
            "circuit_open": float(self.breaker.state is not BreakerState.CLOSED),
        }

    async def deliver(self, delivery: Delivery) -> None:
        try:
            body = self._body(delivery)
        except ProjectionError as error:
            self._counts["refused"] += 1
            raise DeliveryError(
                "unprojectable", error.message, retryable=False, entity=error.entity
            ) from None
        fields = delivery.document.get("fields") or {}
        number = fields.get("erp_ref") if isinstance(fields, Mapping) else None
        try:
            if isinstance(number, str) and number:
                answer = await self._call("PATCH", number, body, delivery)
            else:
                try:
                    answer = await self._call("POST", None, body, delivery)
                    self._counts["created"] += 1
                except _Duplicate as duplicate:
                    answer = await self._call("PATCH", duplicate.number, body, delivery)
        except DeliveryError as error:
            self._counts["refused" if not error.retryable else "failed"] += 1
            if error.retryable:
                self._last_error = str(error)
            raise
        self._counts["delivered"] += 1
        await self._write_back(delivery, fields, answer)

    def _body(self, delivery: Delivery) -> dict[str, Any]:
        """The projection as the API takes it: the ERP keeps no seq of ours (the key does)."""
        projection = self.config.mapping.project(delivery.doc, delivery.seq, delivery.document)
        body: dict[str, Any] = {"external_ref": delivery.doc}
        for kind, entity in self.config.mapping.entities.items():
            skipped = {c.name for c in entity.columns if c.sources == ("seq",)}
            rows = [
                {k: _json(v) for k, v in row.items() if k not in skipped}
                for row in projection[kind]
            ]
            body[BODY_KEYS[kind]] = rows[0] if kind == "order" else rows
        return body

    async def _call(
        self, method: str, number: str | None, body: dict[str, Any], delivery: Delivery
    ) -> _Answer:
        """Create (`number` None) or update the order; raises `_Duplicate` for a create of an
        order the ERP holds already."""
        if self._session is None:
            raise DeliveryError("adapter_stopped", f"{self.name} is not running")
        self.breaker.enter()
        path = ORDERS if number is None else f"{ORDERS}/{quote(number, safe='')}"
        entity = number or delivery.doc
        try:
            async with self._session.request(
                method,
                self.config.base_url.join(URL(path, encoded=True)),
                json=body,
                headers={"Idempotency-Key": delivery.key},
            ) as response:
                status = response.status
                text = await response.read()
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            self.breaker.failed()
            raise DeliveryError(
                "erp_timeout", f"no answer within {self.config.timeout_s:g} s", entity=entity
            ) from None
        except aiohttp.ClientError as error:
            self.breaker.failed()
            raise DeliveryError(
                "erp_unreachable", f"{type(error).__name__}: {error}"[:300], entity=entity
            ) from None
        answer = _json_or_none(text)
        if 200 <= status < 300:
            self.breaker.succeeded()
            if not isinstance(answer, dict) or not isinstance(answer.get("order_number"), str):
                raise DeliveryError(
                    "erp_bad_answer", f"{status} without an order_number", entity=entity
                )
            return _Answer(answer["order_number"], str(answer.get("status") or ""))
        code, message, error_body = _error_of(answer, status)
        if status == 409 and number is None and isinstance(error_body.get("order_number"), str):
            self.breaker.succeeded()
            raise _Duplicate(error_body["order_number"])
        if status in (401, 403, 408, 429) or status >= 500:
            # Not this order's fault: the ERP is down, overloaded or refuses our credentials,
            # for every order alike. Retried, and counted by the breaker.
            self.breaker.failed()
            kind = "erp_unauthorized" if status in (401, 403) else "erp_unavailable"
            raise DeliveryError(
                kind,
                f"{status} {code}: {message}",
                retry_after=_retry_after(retry_after),
                entity=entity,
            )
        self.breaker.succeeded()  # the ERP works; it refuses this order
        raise DeliveryError(
            "erp_refused", f"{status} {code}: {message}", retryable=False, entity=entity
        )

    async def _write_back(
        self, delivery: Delivery, fields: Mapping[str, Any], answer: _Answer
    ) -> None:
        """`fields.erp_ref` and `fields.erp_status` as the ERP answered, as this adapter's
        change (the outbox does not send it back here)."""
        if fields.get("erp_ref") == answer.number and fields.get("erp_status") == answer.status:
            return

        def post(doc: Doc[Any]) -> None:
            with doc.transaction():
                target = doc.get("fields", type=Map)
                if target.get("erp_ref") != answer.number:
                    target["erp_ref"] = answer.number
                if target.get("erp_status") != answer.status:
                    target["erp_status"] = answer.status

        try:
            await self.writer.edit(delivery.doc, post, self._origin)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # The ERP has the order; the retry replays its answer and writes back again.
            log.warning("erp_http %s: writing back %s failed: %s", self.name, delivery.doc, error)
            raise DeliveryError(
                "write_back_failed", f"{type(error).__name__}: {error}"[:300], entity=delivery.doc
            ) from None
        self._counts["written_back"] += 1


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
    return value


def _json_or_none(text: bytes) -> Any:
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None


def _error_of(answer: Any, status: int) -> tuple[str, str, dict[str, Any]]:
    """The ERP's error code and message (`{"error": {"code", "message"}}`, the OData form)."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return "", f"HTTP {status}", {}
    message = error.get("message")
    if isinstance(message, dict):  # OData v2: {"lang": …, "value": …}
        message = message.get("value")
    return str(error.get("code") or ""), str(message or f"HTTP {status}")[:500], error


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds, given as seconds or as an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
