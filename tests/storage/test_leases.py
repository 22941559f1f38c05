"""Leases and fencing on PostgreSQL (cluster mode): one owner per document at a time, a lease
that moves once it expires or is released, and a stale owner's late write refused inside the
group commit without failing the writes committed with it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pycrdt
import pytest

from fieldsync.records import DocIndex, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import (
    Conflict,
    Lease,
    LeaseLost,
    PostgresBackend,
    PostgresLeases,
    Write,
)
from tests.storage.conftest import PostgresSchemas


@pytest.fixture
def url(postgres_schemas: PostgresSchemas) -> Iterator[str]:
    schema = postgres_schemas.take()
    yield postgres_schemas.url(schema)
    postgres_schemas.give_back(schema)


@pytest.fixture
async def nodes(url: str) -> AsyncIterator[list[PostgresBackend]]:
    """Two nodes' backends on one database."""
    backends = [PostgresBackend(url), PostgresBackend(url)]
    for backend in backends:
        await backend.open()
    yield backends
    for backend in backends:
        await backend.close()


def leases(
    backend: PostgresBackend, node: str, ttl: float = 30.0, url: str | None = None
) -> PostgresLeases:
    made = backend.leases(node, url or f"http://{node}.invalid", ttl)
    assert isinstance(made, PostgresLeases)
    return made


def edit(doc: str, text: str, fence: int | None) -> Write:
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    ydoc.get("notes", type=pycrdt.Text).insert(0, text)
    index = DocIndex(doc, "wo", doc, "tina", "north", "east")
    return Write(doc, ydoc.get_update(), Origin(OriginKind.DEVICE, text), "tina", index, (), fence)


async def claimed_by(node: PostgresLeases, doc: str, timeout: float = 20.0) -> Lease:
    """Claim `doc` until `node` holds it (the other node's lease has to expire first)."""
    async with asyncio.timeout(timeout):
        while True:
            lease = await node.claim(doc)
            if lease.ours:
                return lease
            await asyncio.sleep(0.05)


async def test_one_node_holds_a_lease_until_it_expires(nodes: list[PostgresBackend]) -> None:
    a, b = leases(nodes[0], "a", ttl=0.5), leases(nodes[1], "b")
    await a.open()
    await b.open()
    first = await a.claim("wo:1")
    assert first.ours
    # The other node learns who holds it and where that node is reached.
    held = await b.claim("wo:1")
    assert (held.ours, held.node, held.url, held.token) == (False, "a", "http://a.invalid", 1)
    assert await a.renew() == []  # renewing keeps it
    # Unrenewed, it expires and the other node takes it, with a higher token.
    taken = await claimed_by(b, "wo:1")
    assert taken.token > first.token
    assert await a.renew() == ["wo:1"]  # the first node learns it lost it
    assert a.token("wo:1") is None
    assert (await a.claim("wo:1")).node == "b"


async def test_a_released_lease_moves_at_once_and_its_token_still_rises(
    nodes: list[PostgresBackend],
) -> None:
    a, b = leases(nodes[0], "a"), leases(nodes[1], "b")
    first = await a.claim("wo:1")
    assert not (await b.claim("wo:1")).ours
    await a.release(["wo:1"])
    second = await b.claim("wo:1")
    assert second.ours
    assert second.token > first.token
    await b.close()  # a clean shutdown releases every lease
    third = await a.claim("wo:1")
    assert third.ours
    assert third.token > second.token


async def test_a_restarted_node_with_the_same_id_fences_its_predecessor(
    nodes: list[PostgresBackend],
) -> None:
    before = leases(nodes[0], "a")
    old = await before.claim("wo:1")
    after = leases(nodes[1], "a")  # the same node id, a new process: its lease at once
    new = await after.claim("wo:1")
    assert new.ours
    assert new.token > old.token
    with pytest.raises(LeaseLost):
        await nodes[0].store.append(edit("wo:1", "old process", old.token))


async def test_a_stale_owners_late_write_is_refused_and_the_rest_of_its_batch_commits(
    nodes: list[PostgresBackend],
) -> None:
    a, b = leases(nodes[0], "a", ttl=0.5), leases(nodes[1], "b")
    old = await a.claim("wo:1")
    mine = await a.claim("wo:2")
    stored = await nodes[0].store.append(edit("wo:1", "before expiry", old.token))
    new = await claimed_by(b, "wo:1")
    await a.renew()  # keeps wo:2 (renewed after wo:1 expired), loses wo:1
    assert a.token("wo:2") == mine.token
    # Queued together, so they share one group commit: only the stale write fails.
    late = nodes[0].store.append(edit("wo:1", "after expiry", old.token))
    other = nodes[0].store.append(edit("wo:2", "still mine", mine.token))
    unfenced = nodes[0].store.append(edit("wo:3", "no lease", None))
    results = await asyncio.gather(late, other, unfenced, return_exceptions=True)
    assert isinstance(results[0], LeaseLost)
    assert not isinstance(results[1], BaseException)
    assert not isinstance(results[2], BaseException)
    # The new owner writes with its token; the document holds what both owners stored in
    # their time, and nothing of the stale write.
    await nodes[1].store.append(edit("wo:1", "new owner", new.token))
    loaded = await nodes[1].store.load("wo:1")
    assert loaded is not None
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for update in loaded.updates:
        doc.apply_update(update)
    text = str(doc.get("notes", type=pycrdt.Text))
    assert "before expiry" in text
    assert "new owner" in text
    assert "after expiry" not in text
    assert loaded.seq > stored.seq


async def test_a_stale_owners_conflict_record_is_left_out(nodes: list[PostgresBackend]) -> None:
    a, b = leases(nodes[0], "a"), leases(nodes[1], "b")
    old = await a.claim("wo:1")
    await a.release(["wo:1"])
    new = await b.claim("wo:1")

    def conflict(actor: str) -> Conflict:
        return Conflict("wo:1", "status_transition", "no", actor, Origin(OriginKind.DEVICE, actor))

    nodes[0].store.record_conflict(conflict("stale"), fence=old.token)
    nodes[1].store.record_conflict(conflict("owner"), fence=new.token)
    # Appends queued after the records commit in the same or a later batch: once they are
    # stored, so are the records.
    await nodes[0].store.append(edit("wo:2", "after", None))
    await nodes[1].store.append(edit("wo:3", "after", None))
    records = await nodes[1].store.conflicts(ScopeFilter(ScopeKind.ALL), None, 10)
    assert [record.conflict.actor for record in records] == ["owner"]


async def test_two_live_processes_with_one_node_id_are_reported(
    nodes: list[PostgresBackend], caplog: pytest.LogCaptureFixture
) -> None:
    """A restart with the same id is normal (above), and says nothing; two processes that both
    keep renewing as one node (a configuration copied to two hosts) are an error, logged."""
    first = leases(nodes[0], "a", url="http://host-1.invalid")
    await first.open()
    await first.renew()
    # The same process again, at a new address: one process at a time, nothing to report.
    restarted = leases(nodes[1], "a", url="http://host-1b.invalid")
    await restarted.open()
    await restarted.renew()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    # The first process is still alive and renews: two processes are node a.
    await first.renew()
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "another process runs as node 'a'" in error.getMessage()
    assert "http://host-1b.invalid" in error.getMessage()
    # Logged once a minute, not at every renewal.
    await restarted.renew()
    await first.renew()
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2  # one from each
