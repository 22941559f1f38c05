"""`erp_http` against the fake ERP (`fake_erp.py`, its contract in `FAKE_ERP.md`): creates and
updates with idempotency keys, the ERP's answer written back into the document, failures
retried or dead-lettered, and the circuit breaker.

The write-back goes through `DocsWriter` below, a DocumentWriter that applies the adapter's
change to a real pycrdt Doc: the one over the replicator's write path is built elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from fieldsync import documents
from fieldsync.adapters import (
    AdapterConfigError,
    AdapterContext,
    Delivery,
    DeliveryError,
    HealthState,
    Table,
    build_adapter,
    register_kind,
)
from fieldsync.adapters._erp_http import (
    KIND,
    ErpHttpAdapter,
    ErpHttpConfig,
    _retry_after,
    build,
)
from fieldsync.records import Origin, OriginKind
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.contract import AdapterContract
from tests.adapters.fake_erp import FakeErp, running_fake_erp

TOKEN = "erp-secret-token"


class DocsWriter:
    """Documents as pycrdt Docs, edited as the write path would: the change applied, a seq
    given when it changed something."""

    def __init__(self) -> None:
        self.docs: dict[str, Doc[Any]] = {}
        self.seq = 0
        self.origins: list[Origin] = []

    async def edit(
        self, doc_id: str, change: Callable[[Doc[Any]], None], origin: Origin
    ) -> int | None:
        doc = self.docs.setdefault(doc_id, Doc())
        before = doc.get_state()
        change(doc)
        if doc.get_state() == before:
            return None
        self.seq += 1
        self.origins.append(origin)
        return self.seq

    async def read(self, doc_id: str) -> Mapping[str, Any] | None:
        doc = self.docs.get(doc_id)
        return None if doc is None else documents.to_json(doc_id, doc)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[FakeErp]:
    async with running_fake_erp(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def writer() -> DocsWriter:
    return DocsWriter()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make(
    fake: FakeErp, writer: DocsWriter, clock: Clock
) -> AsyncIterator[Callable[..., Any]]:
    started: list[ErpHttpAdapter] = []

    async def make(**settings: Any) -> ErpHttpAdapter:
        table = Table("erp", {"base_url": fake.url, "token": TOKEN, **settings}, {})
        adapter = ErpHttpAdapter("erp", ErpHttpConfig.from_table(table), writer, clock)
        await adapter.start()
        started.append(adapter)
        return adapter

    yield make
    for adapter in started:
        await adapter.stop()


def order(writer: DocsWriter, doc_id: str, seq: int, **fields: Any) -> Delivery:
    """A delivery of work order `doc_id` as the writer holds it, with `fields` set first."""
    doc = writer.docs.get(doc_id)
    if doc is None:
        doc = writer.docs[doc_id] = Doc()
        documents.work_order.write(
            doc,
            {"title": "Replace pump seal", "status": "new", "site": "Plant 1"},
            [{"id": "c1", "label": "Isolate", "required": True}],
            by="sam",
            role="supervisor",
        )
    doc.get("fields", type=Map).update(fields)
    return Delivery("erp", doc_id, seq, documents.to_json(doc_id, doc), 1)


def fields(writer: DocsWriter, doc_id: str) -> dict[str, Any]:
    fields: dict[str, Any] = documents.to_json(doc_id, writer.docs[doc_id])["fields"]
    return fields


async def test_create_then_update_and_the_answer_is_written_back(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    adapter = await make()
    first = order(writer, "wo:1", 3)
    await adapter.deliver(first)
    (created,) = fake.orders.values()
    assert (created.number, created.external_ref, created.status) == ("40000001", "wo:1", "CRTD")
    assert created.content["order"]["title"] == "Replace pump seal"
    assert created.content["operations"][0]["label"] == "Isolate"
    # Posted to ERP: the technician's device shows the ERP's number and status.
    assert (fields(writer, "wo:1")["erp_ref"], fields(writer, "wo:1")["erp_status"]) == (
        "40000001",
        "CRTD",
    )
    assert writer.origins == [Origin(OriginKind.ADAPTER, "erp")]

    documents.work_order.set_status(writer.docs["wo:1"], "in_progress", by="tina", role="t")
    second = order(writer, "wo:1", 5)
    await adapter.deliver(second)
    assert len(fake.orders) == 1
    assert created.versions == 2
    assert fields(writer, "wo:1")["erp_status"] == "PCNF"
    assert [(r["method"], r["key"], r["status"]) for r in fake.requests] == [
        ("POST", first.key, 201),
        ("PATCH", second.key, 200),
    ]
    assert adapter.health().state is HealthState.OK
    assert adapter.metrics()["written_back"] == 2

    await adapter.deliver(order(writer, "wo:1", 7))  # the answer is as written: nothing to write
    assert adapter.metrics()["written_back"] == 2


async def test_an_erp_ref_is_one_path_segment(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    """A reference typed by a supervisor stays inside the orders' collection."""
    adapter = await make()
    with pytest.raises(DeliveryError) as refused:
        await adapter.deliver(order(writer, "wo:esc", 1, erp_ref="../../_fake/release"))
    assert (refused.value.code, refused.value.retryable) == ("erp_refused", False)
    assert "ORDER_NOT_FOUND" in refused.value.message
    assert fake.requests[-1]["path"] == "/api/v1/maintenance-orders/..%2F..%2F_fake%2Frelease"


async def test_accepted_but_connection_lost_then_the_retry_creates_nothing_more(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    adapter = await make()
    fake.fail({"drop": True})
    delivery = order(writer, "wo:2", 1)
    with pytest.raises(DeliveryError) as lost:
        await adapter.deliver(delivery)
    assert lost.value.retryable
    assert lost.value.code == "erp_unreachable"
    assert len(fake.orders) == 1  # the ERP committed it
    assert "erp_ref" not in fields(writer, "wo:2")

    await adapter.deliver(delivery)  # the outbox's retry: same key
    assert len(fake.orders) == 1
    assert fields(writer, "wo:2")["erp_ref"] == "40000001"
    assert [(r["key"], r["status"]) for r in fake.requests] == [
        (delivery.key, "dropped"),
        (delivery.key, 201),  # the stored answer, replayed
    ]


async def test_a_lost_create_coalesced_into_a_later_change_updates_the_order(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    """The answer to seq 1 was lost and the outbox now delivers seq 2 (another key): the ERP
    refuses a second order for the document, and the adapter updates the first."""
    adapter = await make()
    fake.fail({"drop": True})
    with pytest.raises(DeliveryError):
        await adapter.deliver(order(writer, "wo:3", 1))
    await adapter.deliver(order(writer, "wo:3", 2, title="Replace seal and gasket"))
    (only,) = fake.orders.values()
    assert only.content["order"]["title"] == "Replace seal and gasket"
    assert [(r["method"], r["status"]) for r in fake.requests] == [
        ("POST", "dropped"),
        ("POST", 409),
        ("PATCH", 200),
    ]
    assert fields(writer, "wo:3")["erp_ref"] == only.number


async def test_a_timeout_is_retried_and_the_retry_does_not_repeat_the_effect(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    adapter = await make(timeout_s=0.3)
    fake.fail({"hold": True})  # the ERP writes the order, then does not answer
    delivery = order(writer, "wo:4", 1)
    with pytest.raises(DeliveryError) as late:
        await adapter.deliver(delivery)
    assert (late.value.code, late.value.retryable) == ("erp_timeout", True)
    await adapter.deliver(delivery)
    assert len(fake.orders) == 1
    assert fields(writer, "wo:4")["erp_ref"] == "40000001"


async def test_a_slow_answer_within_the_timeout_is_an_answer(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    adapter = await make(timeout_s=5)
    fake.fail({"delay_s": 0.2})
    await adapter.deliver(order(writer, "wo:5", 1))
    assert fields(writer, "wo:5")["erp_ref"] == "40000001"


async def test_overload_and_errors_are_retried_after_what_the_erp_asks(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    adapter = await make()
    async with aiohttp.ClientSession() as client:  # failures injected as FAKE_ERP.md says
        injected = [{"status": 429, "retry_after": "7"}, {"status": 502}]
        async with client.post(f"{fake.url}/_fake/failures", json=injected) as answer:
            assert answer.status == 200
    delivery = order(writer, "wo:6", 1)
    with pytest.raises(DeliveryError) as limited:
        await adapter.deliver(delivery)
    assert (limited.value.retryable, limited.value.retry_after) == (True, 7.0)
    with pytest.raises(DeliveryError) as failed:
        await adapter.deliver(delivery)
    assert (failed.value.retryable, failed.value.code) == (True, "erp_unavailable")
    assert adapter.health().state is HealthState.DEGRADED
    await adapter.deliver(delivery)
    assert len(fake.orders) == 1
    assert adapter.health().state is HealthState.OK
    async with aiohttp.ClientSession() as client, client.get(f"{fake.url}/_fake/requests") as got:
        assert [r["status"] for r in await got.json()] == [429, 502, 201]


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    assert _retry_after("120") == 120.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: at once
    assert _retry_after("soon") is None


async def test_a_business_refusal_is_dead_lettered_with_the_erps_message(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter
) -> None:
    adapter = await make(breaker_failures=1)
    with pytest.raises(DeliveryError) as refused:
        await adapter.deliver(order(writer, "wo:7", 1, title=""))
    assert refused.value.retryable is False
    assert refused.value.code == "erp_refused"
    assert "TITLE_REQUIRED: An order needs a title" in refused.value.message
    assert refused.value.entity == "wo:7"
    assert fake.orders == {}
    # The ERP answered: it is not failing, so the breaker stays closed.
    assert adapter.health().state is HealthState.OK
    await adapter.deliver(order(writer, "wo:8", 1))


async def test_the_breaker_opens_probes_and_closes(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter, clock: Clock
) -> None:
    adapter = await make(breaker_failures=3, breaker_cooldown_s=30)
    fake.fail({"status": 503, "times": 3})
    delivery = order(writer, "wo:9", 1)
    for _ in range(3):
        with pytest.raises(DeliveryError, match="erp_unavailable"):
            await adapter.deliver(delivery)
    health = adapter.health()
    assert health.state is HealthState.DOWN
    assert "circuit open" in health.detail

    # Open: the ERP is not called at all.
    with pytest.raises(DeliveryError) as refused:
        await adapter.deliver(delivery)
    assert (refused.value.code, refused.value.retryable) == ("erp_circuit_open", True)
    assert refused.value.retry_after == 30
    assert len(fake.requests) == 3

    # After the cool-down one probe goes through; it fails, and the breaker opens again.
    clock.now += 30
    fake.fail({"status": 503})
    with pytest.raises(DeliveryError, match="erp_unavailable"):
        await adapter.deliver(delivery)
    with pytest.raises(DeliveryError, match="erp_circuit_open"):
        await adapter.deliver(delivery)
    assert len(fake.requests) == 4

    clock.now += 30
    await adapter.deliver(delivery)  # the probe succeeds: closed
    assert adapter.health().state is HealthState.OK
    await adapter.deliver(order(writer, "wo:10", 1))
    assert len(fake.orders) == 2


async def test_credentials_the_erp_refuses_count_against_the_erp_not_the_order(
    fake: FakeErp, writer: DocsWriter
) -> None:
    table = Table("erp", {"base_url": fake.url, "token": "wrong", "breaker_failures": 1}, {})
    adapter = ErpHttpAdapter("erp", ErpHttpConfig.from_table(table), writer)
    await adapter.start()
    try:
        with pytest.raises(DeliveryError) as refused:
            await adapter.deliver(order(writer, "wo:11", 1))
    finally:
        await adapter.stop()
    assert (refused.value.code, refused.value.retryable) == ("erp_unauthorized", True)
    assert adapter.health().state is HealthState.DOWN


register_kind(KIND, build)  # until KINDS lists it


class TestErpHttpContract(AdapterContract):
    kind = KIND

    @pytest.fixture
    def adapter_context(self, tmp_path: Path, sqlite_store: SQLiteStore) -> AdapterContext:
        """With a write path: erp_http writes the ERP's answer back."""
        outbox, reference = SQLiteOutbox(sqlite_store), SQLiteReference(sqlite_store)
        return AdapterContext(tmp_path, outbox, reference, DocsWriter())

    def good_table(self) -> dict[str, Any]:
        return {"base_url": "https://erp.example.com/sap/", "token": "t"}

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"base_url": "ftp://erp.example.com/"}, "base_url"),
            ({"base_url": "http://erp.example.com/"}, "base_url"),  # plain HTTP off loopback
            ({"base_url": "https://fs:pw@erp.example.com/"}, "base_url"),
            ({"timeout_s": 0}, "timeout_s"),
            ({"token": None, "username": "fs"}, "password"),
            ({"username": "fs", "password": "pw"}, "token"),
            ({"breaker_failures": 0}, "breaker_failures"),
            ({"mapping": "/no/such/mapping.toml"}, "mapping"),
        ]


def test_without_a_write_path_erp_http_is_refused(adapter_context: AdapterContext) -> None:
    table = Table("erp", {"kind": KIND, "base_url": "https://erp.example.com/"}, {})
    with pytest.raises(AdapterConfigError, match="no write path"):
        build_adapter(table, adapter_context)


def test_credentials_come_from_the_environment() -> None:
    environ = {"ERP_TOKEN": "t0k"}
    table = {"base_url": "https://erp.example.com/sap", "token": {"env": "ERP_TOKEN"}}
    found = ErpHttpConfig.from_table(Table("erp", table, environ))
    assert (found.token, str(found.base_url)) == ("t0k", "https://erp.example.com/sap/")
    with pytest.raises(AdapterConfigError, match="ERP_TOKEN is not set"):
        ErpHttpConfig.from_table(Table("erp", table, {}))


async def test_a_probe_in_flight_is_the_only_call_a_half_open_breaker_lets_through(
    make: Callable[..., Any], fake: FakeErp, writer: DocsWriter, clock: Clock
) -> None:
    adapter = await make(breaker_failures=1, breaker_cooldown_s=30)
    fake.fail({"status": 500})
    with pytest.raises(DeliveryError, match="erp_unavailable"):
        await adapter.deliver(order(writer, "wo:20", 1))
    clock.now += 30
    fake.fail({"hold": True})
    probe = asyncio.create_task(adapter.deliver(order(writer, "wo:20", 1)))
    await fake.arrived(2)
    assert adapter.health().state is HealthState.DEGRADED
    with pytest.raises(DeliveryError, match="erp_circuit_open"):
        await adapter.deliver(order(writer, "wo:21", 1))
    await fake.release()
    await probe
    assert adapter.health().state is HealthState.OK
    await adapter.deliver(order(writer, "wo:21", 1))
    assert len(fake.orders) == 2


# --- the fake ERP keeps its contract (FAKE_ERP.md) -------------------------------------------


async def test_the_fake_erp_keeps_its_idempotency_contract(fake: FakeErp) -> None:
    url = f"{fake.url}/api/v1/maintenance-orders"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"external_ref": "wo:c", "order": {"title": "t", "status_code": "REL"}}
    async with aiohttp.ClientSession(headers=auth) as client:
        async with client.post(url, json=body) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["code"] == "IDEMPOTENCY_KEY_MISSING"
        fake.fail({"status": 503})
        async with client.post(url, json=body, headers={"Idempotency-Key": "k1"}) as answer:
            assert answer.status == 503  # not stored: the key may be used again
        fake.fail({"delay_s": 0.05})
        answers = await asyncio.gather(
            *(_post(client, url, body, "k1") for _ in range(2))  # the same key, at once
        )
        assert [status for status, _, _ in answers] == [201, 201]
        assert (
            answers[0][1]
            == answers[1][1]
            == {
                "order_number": "40000001",
                "status": "REL",
                "external_ref": "wo:c",
            }
        )
        assert sorted(str(replayed) for _, _, replayed in answers) == ["None", "true"]
        status, error, _ = await _post(client, url, {**body, "order": {"title": "u"}}, "k1")
        assert (status, error["error"]["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
        status, error, _ = await _post(client, url, body, "k2")
        assert (status, error["error"]["order_number"]) == (409, "40000001")
        closed = {**body, "order": {"title": "t", "status_code": "CLSD"}}
        async with client.patch(
            f"{url}/40000001", json=closed, headers={"Idempotency-Key": "k3"}
        ) as answer:
            assert answer.status == 200
        changed = {**body, "order": {"title": "v", "status_code": "CLSD"}}
        headers = {"Idempotency-Key": "k4"}
        async with client.patch(f"{url}/40000001", json=changed, headers=headers) as answer:
            assert (answer.status, (await answer.json())["error"]["code"]) == (422, "ORDER_CLOSED")
    async with aiohttp.ClientSession() as stranger, stranger.get(f"{url}/40000001") as answer:
        assert answer.status == 401
    assert len(fake.orders) == 1


async def _post(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str
) -> tuple[int, Any, str | None]:
    async with client.post(url, json=body, headers={"Idempotency-Key": key}) as answer:
        return answer.status, await answer.json(), answer.headers.get("Idempotent-Replayed")
