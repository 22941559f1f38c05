"""The `Outbox` contract every backend keeps: entries written with the change that owes them,
due per document (coalesced, oldest first), backoff, dead letters that pause only their
document, and an operator's retry, skip, replay and purge. (The runner that drives it, and
SQLite's crash test, are in tests/adapters/test_outbox.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pycrdt
import pytest

from fieldsync.records import Origin, OriginKind
from fieldsync.storage import (
    Backend,
    DueDoc,
    Outbox,
    OutboxError,
    OutboxState,
    Store,
    Write,
)

PHONE = Origin(OriginKind.DEVICE, "phone")
TIMEOUT = OutboxError("timeout", "the ERP did not answer", "order 17")


@pytest.fixture
def outbox(backend: Backend) -> Outbox:
    backend.outbox.route({"wo": ["erp", "crm"], "form": ["forms"]})
    return backend.outbox


async def change(store: Store, doc: str, origin: Origin = PHONE) -> int:
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    ydoc.get("body", type=pycrdt.Text).insert(0, f"{doc} {time.monotonic()}")
    return (await store.append(Write(doc, ydoc.get_update(), origin, "sam"))).seq


async def states(outbox: Outbox, adapter: str = "erp") -> list[tuple[str, int, OutboxState]]:
    return [(e.doc, e.seq, e.state) for e in await outbox.entries(adapter=adapter, limit=100)]


async def test_a_committed_change_has_an_entry_for_each_adapter_of_its_type(
    backend: Backend, store: Store
) -> None:
    committed = asyncio.Event()
    backend.outbox.route({"wo": ["erp", "crm"], "form": ["forms"]}, committed.set)
    outbox = backend.outbox
    first = await change(store, "wo:1")
    # Already there when the ack arrives: written in the update's own transaction.
    assert [(e.adapter, e.doc, e.seq) for e in await outbox.entries(limit=10)] == [
        ("erp", "wo:1", first),
        ("crm", "wo:1", first),
    ]
    await asyncio.wait_for(committed.wait(), 5)
    # An adapter is never sent back what it wrote; another adapter is.
    by_erp = await change(store, "wo:1", Origin(OriginKind.ADAPTER, "erp"))
    form = await change(store, "form:1")
    assert await states(outbox, "erp") == [("wo:1", first, OutboxState.PENDING)]
    assert [e.seq for e in await outbox.entries(adapter="crm", limit=10)] == [first, by_erp]
    assert [(e.doc, e.seq) for e in await outbox.entries(adapter="forms", limit=10)] == [
        ("form:1", form)
    ]
    entry = (await outbox.entries(limit=1))[0]
    assert await outbox.entry(entry.id) == entry
    assert await outbox.entry(entry.id + 1000) is None
    assert [e.id for e in await outbox.entries(after_id=entry.id, limit=10)] == [
        e.id for e in (await outbox.entries(limit=10))[1:]
    ]


async def test_pending_changes_are_due_per_document_oldest_first(
    outbox: Outbox, store: Store
) -> None:
    one = await change(store, "wo:1")
    two = await change(store, "wo:2")
    again = await change(store, "wo:1")
    now = time.time() + 1
    assert await outbox.due("erp", now, 10) == [
        DueDoc("erp", "wo:1", one, again, 0),
        DueDoc("erp", "wo:2", two, two, 0),
    ]
    assert await outbox.due("erp", now, 1) == [DueDoc("erp", "wo:1", one, again, 0)]
    assert await outbox.delivered("erp", "wo:1", again, now) == 2
    assert await outbox.due("erp", now, 10) == [DueDoc("erp", "wo:2", two, two, 0)]
    # Another adapter's entries are its own.
    assert len(await outbox.due("crm", now, 10)) == 2
    assert await outbox.next_due("nobody") is None


async def test_a_failure_waits_its_backoff_and_a_dead_letter_pauses_only_its_document(
    outbox: Outbox, store: Store
) -> None:
    one = await change(store, "wo:1")
    two = await change(store, "wo:2")
    now = time.time() + 1
    assert await outbox.failed("erp", "wo:1", one, TIMEOUT, now + 10, now) == 1
    assert [d.doc for d in await outbox.due("erp", now, 10)] == ["wo:2"]
    assert await outbox.next_due("erp") is not None
    retried = await outbox.due("erp", now + 10, 10)
    assert [(d.doc, d.attempts) for d in retried] == [("wo:1", 1), ("wo:2", 0)]

    assert await outbox.dead_letter("erp", "wo:1", one, TIMEOUT, now) == 1
    later = await change(store, "wo:1")  # waits behind the dead entry
    assert [d.doc for d in await outbox.due("erp", now + 20, 10)] == ["wo:2"]
    (dead,) = await outbox.entries(adapter="erp", state=OutboxState.DEAD, limit=10)
    assert (dead.doc, dead.seq, dead.attempts, dead.error) == ("wo:1", one, 2, TIMEOUT)
    stats = await outbox.stats()
    assert (stats["erp"].pending, stats["erp"].dead) == (2, 1)
    assert stats["erp"].oldest_pending_at is not None

    # The operator retries: the document's dead and pending entries are one delivery, now.
    back = await outbox.retry(dead.id, now + 30)
    assert back is not None
    assert (back.state, back.attempts) == (OutboxState.PENDING, 0)
    assert await outbox.due("erp", now + 30, 10) == [
        DueDoc("erp", "wo:1", one, later, 0),
        DueDoc("erp", "wo:2", two, two, 0),
    ]
    assert await outbox.retry(dead.id + 1000, now) is None


async def test_a_skipped_entry_is_never_delivered(outbox: Outbox, store: Store) -> None:
    one = await change(store, "wo:1")
    two = await change(store, "wo:1")
    now = time.time() + 1
    await outbox.dead_letter("erp", "wo:1", one, TIMEOUT, now)
    first = (await outbox.entries(adapter="erp", limit=10))[0]
    skipped = await outbox.skip(first.id, now)
    assert skipped is not None
    assert skipped.state is OutboxState.SKIPPED
    # Only up to the skipped entry's seq; the later change flows again.
    assert await states(outbox) == [
        ("wo:1", one, OutboxState.SKIPPED),
        ("wo:1", two, OutboxState.PENDING),
    ]
    assert await outbox.due("erp", now, 10) == [DueDoc("erp", "wo:1", two, two, 0)]


async def test_replay_delivers_again_and_purge_drops_what_is_done(
    outbox: Outbox, store: Store
) -> None:
    seqs = [await change(store, f"wo:{n}") for n in range(3)]
    now = time.time() + 1
    for n, seq in enumerate(seqs):
        await outbox.delivered("erp", f"wo:{n}", seq, now)
    assert await outbox.due("erp", now, 10) == []
    assert await outbox.replay("erp", seqs[1], now) == 2
    assert [d.doc for d in await outbox.due("erp", now, 10)] == ["wo:1", "wo:2"]
    assert await outbox.purge(now + 1) == 1  # wo:0's delivered entry; crm's are pending
    assert [doc for doc, _, _ in await states(outbox)] == ["wo:1", "wo:2"]
    assert set(await outbox.stats()) == {"erp", "crm"}
