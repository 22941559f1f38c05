"""The outbox over a real SQLite store: entries written with their update, delivered per
document in order and coalesced, retried with backoff (time driven by a clock the test moves),
dead-lettered without holding up other documents, and an operator's retry, skip and replay."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from pycrdt import Doc, Map

from fieldsync.adapters import Backoff, DeliveryError, OutboxRunner
from fieldsync.records import Origin, OriginKind
from fieldsync.storage import OutboxEntry, OutboxState, StorageError, Write
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.recorder import Recorder
from tests.harness import work_order

PHONE = Origin(OriginKind.DEVICE, "phone")


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Documents:
    """Work orders written to the store the way the write path writes them: effective Yjs
    updates, each committed as one `Write`."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.docs: dict[str, Doc[Any]] = {}

    async def write(self, doc_id: str, origin: Any = PHONE, **fields: Any) -> int:
        doc = self.docs.get(doc_id)
        if doc is None:
            doc = self.docs[doc_id] = work_order(doc_id)
            update = doc.get_update()
        else:
            before = doc.get_state()
            root = doc.get("fields", type=Map)
            for key, value in fields.items():
                root[key] = value
            update = doc.get_update(before)
        committed = await self.store.append(Write(doc_id, update, origin, "sam"))
        return committed.seq


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def erp() -> Recorder:
    return Recorder("erp", max_attempts=3)


@pytest.fixture
def outbox(sqlite_store: SQLiteStore) -> SQLiteOutbox:
    return SQLiteOutbox(sqlite_store)


@pytest.fixture
def runner(
    sqlite_store: SQLiteStore, outbox: SQLiteOutbox, erp: Recorder, clock: Clock
) -> OutboxRunner:
    # draw 0: the shortest backoff the jitter allows, half the ceiling.
    runner = OutboxRunner(
        outbox, sqlite_store, [erp], clock=clock, draw=lambda: 0.0, backoff=Backoff(1.0, 60.0)
    )
    runner.subscribe()
    return runner


@pytest.fixture
def docs(sqlite_store: SQLiteStore, runner: OutboxRunner) -> Documents:
    return Documents(sqlite_store)


async def entries(outbox: SQLiteOutbox, **filters: Any) -> list[OutboxEntry]:
    return await outbox.entries(limit=1000, **filters)


async def test_an_acknowledged_update_has_its_entry_in_the_same_transaction(
    tmp_path: Path, sqlite_store: SQLiteStore, outbox: SQLiteOutbox, docs: Documents
) -> None:
    seq = await docs.write("wo:1")
    assert [(e.adapter, e.doc, e.seq, e.state) for e in await entries(outbox)] == [
        ("erp", "wo:1", seq, OutboxState.PENDING)
    ]
    # Forms are not routed to `erp`: no entry.
    form: Doc[Any] = Doc()
    form.get("answers", type=Map)["a"] = 1
    await sqlite_store.append(
        Write("form:1", form.get_update(), Origin(OriginKind.DEVICE, "phone"), "tina")
    )
    assert len(await entries(outbox)) == 1
    # An entry that cannot be written takes its update down with it: the transaction holding
    # both is rolled back, so the update is not acknowledged and not stored.
    head = await sqlite_store.head()
    await sqlite_store.transact(
        lambda txn: txn.db.execute(
            "INSERT INTO outbox (adapter, doc, seq, created_at, updated_at, next_at)"
            " VALUES ('erp', 'wo:2', ?, 0, 0, 0)",
            (head + 1,),
        )
    )
    with pytest.raises(StorageError):
        await docs.write("wo:2")
    assert await sqlite_store.load("wo:2") is None
    assert await sqlite_store.head() == head
    # And what was acknowledged is on disk, read by another connection.
    with sqlite3.connect(tmp_path / "fieldsync.db") as db:
        assert db.execute("SELECT doc, seq FROM outbox WHERE doc = 'wo:1'").fetchall() == [
            ("wo:1", seq)
        ]


async def test_a_document_is_delivered_in_order_its_pending_changes_coalesced(
    runner: OutboxRunner, docs: Documents, erp: Recorder, outbox: SQLiteOutbox
) -> None:
    await docs.write("wo:1")
    await docs.write("wo:2")
    await docs.write("wo:1", title="second")
    last = await docs.write("wo:1", title="third")
    assert await runner.deliver_due() == 2
    # Three changes of wo:1, one delivery of its latest state, keyed by its latest seq.
    assert erp.seqs("wo:1") == [last]
    delivery = erp.deliveries[0] if erp.deliveries[0].doc == "wo:1" else erp.deliveries[1]
    assert delivery.document["fields"]["title"] == "third"
    assert delivery.key == f"erp:wo:1:{last}"
    assert delivery.attempt == 1
    assert {e.state for e in await entries(outbox)} == {OutboxState.DELIVERED}
    newer = await docs.write("wo:1", title="fourth")
    await runner.deliver_due()
    assert erp.seqs("wo:1") == [last, newer]
    assert erp.applied["wo:1"][1]["fields"]["title"] == "fourth"
    assert await runner.deliver_due() == 0


async def test_a_failure_is_retried_after_a_backoff_and_not_before_retry_after(
    runner: OutboxRunner, docs: Documents, erp: Recorder, clock: Clock, outbox: SQLiteOutbox
) -> None:
    await docs.write("wo:1")
    erp.script["wo:1"] = [
        DeliveryError("erp_unavailable", "503 from the ERP"),
        DeliveryError("rate_limited", "429", retry_after=30.0),
    ]
    await runner.deliver_due()
    (entry,) = await entries(outbox)
    assert (entry.state, entry.attempts) == (OutboxState.PENDING, 1)
    assert entry.error is not None
    assert entry.error.code == "erp_unavailable"
    assert entry.next_at == clock.now + 0.5  # base 1 s, jitter drawn at its low end
    # A change committed meanwhile waits with the rest: no early retry.
    await docs.write("wo:1", title="meanwhile")
    clock.now += 0.4
    assert await runner.deliver_due() == 0
    clock.now += 0.1
    await runner.deliver_due()  # the second attempt: 429 with Retry-After 30 s
    (entry, _) = await entries(outbox)
    assert entry.attempts == 2
    assert entry.next_at == clock.now + 30.0
    clock.now += 29.9
    assert await runner.deliver_due() == 0
    clock.now += 0.1
    await runner.deliver_due()
    assert [d.attempt for d in erp.deliveries] == [1, 2, 3]
    assert erp.applied["wo:1"][1]["fields"]["title"] == "meanwhile"
    assert {e.state for e in await entries(outbox)} == {OutboxState.DELIVERED}


def test_the_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    assert [backoff.delay(n, None, 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff.delay(3, None, 0.999) == pytest.approx(4.0, abs=0.01)
    assert backoff.delay(20, None, 0.0) == 30.0
    assert backoff.delay(500, None, 1.0) == 60.0
    assert backoff.delay(1, 120.0, 0.5) == 120.0  # Retry-After is a floor


async def poison_until_dead(runner: OutboxRunner, clock: Clock, erp: Recorder, doc: str) -> None:
    erp.poison[doc] = DeliveryError(
        "rejected_by_erp", "cost centre K-17 is closed", entity="order/4711"
    )
    for _ in range(erp.max_attempts):
        clock.now += 120  # past any backoff
        await runner.deliver_due()


async def test_a_poison_document_is_dead_lettered_while_the_others_flow_then_retried(
    runner: OutboxRunner, docs: Documents, erp: Recorder, clock: Clock, outbox: SQLiteOutbox
) -> None:
    bad = await docs.write("wo:bad")
    await docs.write("wo:good")
    await poison_until_dead(runner, clock, erp, "wo:bad")
    (dead,) = await entries(outbox, state=OutboxState.DEAD)
    assert (dead.adapter, dead.doc, dead.seq, dead.attempts) == ("erp", "wo:bad", bad, 3)
    assert dead.error is not None
    assert (dead.error.code, dead.error.message, dead.error.entity) == (
        "rejected_by_erp",
        "cost centre K-17 is closed",
        "order/4711",
    )
    # Only that document waits: its new change is not delivered past the dead entry, while
    # every other document keeps flowing.
    tried = len(erp.seqs("wo:bad"))
    await docs.write("wo:bad", title="still bad")
    newer = await docs.write("wo:good", title="fine")
    clock.now += 3600
    await runner.deliver_due()
    assert len(erp.seqs("wo:bad")) == tried
    assert erp.applied["wo:good"][0] == newer
    assert (await runner.metrics())["erp"]["dead"] == 1
    # The ERP's data is fixed; the operator retries: the document's latest state goes.
    del erp.poison["wo:bad"]
    retried = await outbox.retry(dead.id, clock.now)
    assert retried is not None
    assert (retried.state, retried.attempts) == (OutboxState.PENDING, 0)
    await runner.deliver_due()
    assert erp.applied["wo:bad"][1]["fields"]["title"] == "still bad"
    assert {e.state for e in await entries(outbox, doc="wo:bad")} == {OutboxState.DELIVERED}


async def test_a_refusal_no_retry_can_change_is_dead_lettered_at_once(
    runner: OutboxRunner, docs: Documents, erp: Recorder, outbox: SQLiteOutbox
) -> None:
    await docs.write("wo:1")
    erp.script["wo:1"] = [DeliveryError("invalid_order", "no such plant", retryable=False)]
    await runner.deliver_due()
    (entry,) = await entries(outbox)
    assert (entry.state, entry.attempts) == (OutboxState.DEAD, 1)


async def test_an_unexpected_adapter_error_is_retried_and_recorded(
    runner: OutboxRunner, docs: Documents, erp: Recorder, outbox: SQLiteOutbox, clock: Clock
) -> None:
    await docs.write("wo:1")
    erp.script["wo:1"] = [cast(Any, KeyError("plant"))]
    await runner.deliver_due()
    (entry,) = await entries(outbox)
    assert entry.state is OutboxState.PENDING
    assert entry.error is not None
    assert entry.error.code == "adapter_error"
    assert "KeyError" in entry.error.message
    clock.now += 10
    await runner.deliver_due()
    assert (await entries(outbox))[0].state is OutboxState.DELIVERED


async def test_a_skipped_entry_is_never_delivered_and_its_document_flows_again(
    runner: OutboxRunner, docs: Documents, erp: Recorder, clock: Clock, outbox: SQLiteOutbox
) -> None:
    await docs.write("wo:1")
    await poison_until_dead(runner, clock, erp, "wo:1")
    (dead,) = await entries(outbox, state=OutboxState.DEAD)
    del erp.poison["wo:1"]
    skipped = await outbox.skip(dead.id, clock.now)
    assert skipped is not None
    assert skipped.state is OutboxState.SKIPPED
    await runner.deliver_due()
    assert "wo:1" not in erp.applied
    later = await docs.write("wo:1", title="next")
    await runner.deliver_due()
    assert erp.applied["wo:1"][0] == later
    assert await outbox.skip(10_000, clock.now) is None
    assert await outbox.retry(10_000, clock.now) is None


async def test_replay_delivers_again_from_a_seq(
    runner: OutboxRunner, docs: Documents, erp: Recorder, clock: Clock, outbox: SQLiteOutbox
) -> None:
    await docs.write("wo:1")
    from_seq = await docs.write("wo:2")
    await docs.write("wo:3")
    await runner.deliver_due()
    assert len(erp.deliveries) == 3
    # The ERP was restored from a backup taken before `from_seq`.
    erp.applied.clear()
    assert await outbox.replay("erp", from_seq, clock.now) == 2
    await runner.deliver_due()
    assert sorted(erp.applied) == ["wo:2", "wo:3"]
    assert await outbox.replay("nobody", 0, clock.now) == 0


async def test_an_adapter_is_never_sent_back_what_it_wrote(
    sqlite_store: SQLiteStore, outbox: SQLiteOutbox, docs: Documents, clock: Clock
) -> None:
    erp, projection = Recorder("erp"), Recorder("projection")
    runner = OutboxRunner(outbox, sqlite_store, [erp, projection], clock=clock)
    runner.subscribe()
    # The store compares the origin's text form, the same for a typed `Origin` (which
    # `Write.origin` is becoming) and for its text.
    origin = str(Origin(OriginKind.ADAPTER, "erp"))
    await docs.write("wo:1", origin=origin)
    await docs.write("wo:1", origin=origin, title="t")
    await docs.write("wo:2", origin=Origin(OriginKind.ADAPTER, "projection"))
    made = [(e.adapter, e.doc) for e in await entries(outbox)]
    assert made == [("projection", "wo:1"), ("projection", "wo:1"), ("erp", "wo:2")]
    await runner.deliver_due()
    assert [d.doc for d in erp.deliveries] == ["wo:2"]
    assert [d.doc for d in projection.deliveries] == ["wo:1"]


async def test_metrics_give_pending_lag_and_dead_letters(
    runner: OutboxRunner, docs: Documents, erp: Recorder, clock: Clock
) -> None:
    await docs.write("wo:1")
    metrics = (await runner.metrics())["erp"]
    assert metrics["pending"] == 1
    assert metrics["dead"] == 0
    erp.script["wo:1"] = [DeliveryError("down", "connection refused")]
    await runner.deliver_due()
    clock.now += 90
    metrics = (await runner.metrics())["erp"]
    assert metrics["pending"] == 1
    assert metrics["attempts"] == 1
    assert metrics["failures"] == 1
    assert metrics["lag_seconds"] >= 90


async def test_the_runner_delivers_as_commits_arrive_and_finishes_in_flight_work_on_stop(
    sqlite_store: SQLiteStore, outbox: SQLiteOutbox, docs: Documents
) -> None:
    gate = asyncio.Event()

    class Slow(Recorder):
        async def deliver(self, delivery: Any) -> None:
            await super().deliver(delivery)
            await gate.wait()

    erp = Slow("erp")
    runner = OutboxRunner(outbox, sqlite_store, [erp])
    await runner.start()
    try:
        await docs.write("wo:1")
        # Woken by the commit itself, not by a poll.
        async with asyncio.timeout(2):
            await erp.changed.wait()
    finally:
        stopping = asyncio.create_task(runner.stop())
        await asyncio.sleep(0)
        assert not stopping.done()  # it waits for the delivery in flight
        gate.set()
        await stopping
    assert [e.state for e in await entries(outbox)] == [OutboxState.DELIVERED]


async def test_delivered_entries_are_purged_after_the_retention(
    sqlite_store: SQLiteStore, outbox: SQLiteOutbox, docs: Documents, clock: Clock
) -> None:
    runner = OutboxRunner(outbox, sqlite_store, [Recorder("erp")], clock=clock, retention_days=1.0)
    runner.subscribe()
    await docs.write("wo:1")
    await runner.deliver_due()
    clock.now += 3600
    assert await runner.purge() == 0
    clock.now += 86_400
    assert await runner.purge() == 1
    assert await entries(outbox) == []


_WRITER = """
import asyncio, sys
from pathlib import Path
from fieldsync.records import Origin, OriginKind
from fieldsync.storage import SQLiteBackend, Write
from tests.harness import work_order

async def main():
    backend = SQLiteBackend(Path(sys.argv[1]))
    await backend.open()
    store = backend.store
    backend.outbox.route({"wo": ["erp"]})
    n = 0
    while True:
        batch = [f"wo:k{n + i}" for i in range(20)]
        rest = Origin(OriginKind.REST)
        writes = [Write(d, work_order(d).get_update(), rest, "sam") for d in batch]
        acks = [store.append(write) for write in writes]
        for ack in acks:
            print((await ack).seq, flush=True)
        n += 20

asyncio.run(main())
"""


async def test_a_killed_writer_leaves_an_entry_for_every_acknowledged_update(
    tmp_path: Path,
) -> None:
    path = tmp_path / "killed.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WRITER,
        str(path),
        cwd=Path(__file__).parent.parent.parent,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acked: list[int] = []
    async with asyncio.timeout(60):
        while len(acked) < 150:
            acked.append(int(await child.stdout.readline()))
    child.kill()  # SIGKILL, mid-stream: writes in flight, batches half-built
    await child.wait()
    with sqlite3.connect(path) as db:
        updates = {seq for (seq,) in db.execute("SELECT seq FROM updates")}
        entries = {seq for (seq,) in db.execute("SELECT seq FROM outbox WHERE adapter = 'erp'")}
    assert set(acked) <= entries
    # And the other way round: no entry without its update, no update without its entry.
    assert entries == updates
