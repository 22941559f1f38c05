"""Peers waiting for a document that does not exist yet: however their first updates interleave
with its creation, each one ends up with the whole document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pycrdt import Map

from fieldsync.replication import Replicator
from fieldsync.storage import SQLiteBackend
from tests.harness import Replica


@pytest.fixture
async def replicator(tmp_path: Path) -> AsyncIterator[Replicator]:
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    await backend.open()
    replicator = Replicator(backend.store)
    await replicator.start()
    try:
        yield replicator
    finally:
        await replicator.stop()
        await backend.close()


async def test_a_waiting_peer_whose_first_update_follows_the_creation_gets_it(
    replicator: Replicator,
) -> None:
    """A creates the document; B, waiting for it, writes right after A's commit and before the
    server settles its waiting peers. B is admitted by its write: it must get A's creation too,
    or every later update of A waits in B's replica forever."""
    a, b = Replica("a"), Replica("b")
    room = await replicator.subscribe(a, "wo:p1")
    await replicator.subscribe(b, "wo:p1")
    created = (await replicator.submit(a, room, a.edit("created"))).committed
    assert created is not None
    await created  # resumes before the task that settles the waiting peers has run
    done = (await replicator.submit(b, room, b.edit("b"))).committed
    assert done is not None
    await done
    later = (await replicator.submit(a, room, a.edit("later"))).committed
    assert later is not None
    await later
    for replica in (a, b):
        assert replica.doc.get("fields", type=Map).to_py() == {
            "created": "a",
            "b": "b",
            "later": "a",
        }, replica.principal.subject
