"""A peer's update reaches the other replicas before it is durable (`Replicator._commit`); the
durable promises do not: no ack and no durable state vector covers it, and the change feed does
not list it, until it is committed. When the commit then fails, every replica that got it is
reset and drops it, and its author's device sends it again.

The storage fails for real: another connection holds SQLite's write lock past the server
writer's busy timeout (`write_lock_held`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pycrdt import Doc, Map, Text

from fieldsync.app import STORE
from fieldsync.client import Client
from fieldsync.records import ScopeFilter, ScopeKind
from fieldsync.replication import SyncStep, YSync, decode_state_vector
from tests.harness import Server, eventually, stored_doc, write_lock_held
from tests.wire import sam_and_tina

EVERYTHING = ScopeFilter(ScopeKind.ALL)


def notes(doc: Doc[Any]) -> str:
    return str(doc.get("notes", type=Text))


def covers(clock: dict[Any, int], client: int, upto: int) -> bool:
    return int(clock.get(client, clock.get(str(client), 0))) >= upto


async def test_a_peer_has_an_update_before_any_ack_or_durable_state_vector_covers_it(
    server: Server,
) -> None:
    doc_id = "wo:relay-early"
    store = server.app[STORE]
    async with sam_and_tina(server, doc_id) as (sam, tina):
        theirs = await sam.replica(doc_id)
        await sam.doc_message(doc_id, SyncStep.STEP1)  # the durable state vector, all committed
        mine = await tina.replica(doc_id)
        head = await store.head()
        with write_lock_held(server):
            before = theirs.get_state()
            theirs.get("notes", type=Text).insert(0, "never stored ")
            await sam.update(doc_id, theirs.get_update(before))
            writer = theirs.client_id
            upto = decode_state_vector(theirs.get_state())[writer]
            # tina has it while no commit can happen: it was relayed before it was durable.
            await tina.follow(doc_id, mine, lambda d: "never stored" in notes(d))
            # A device syncing now is shown it (a step 2 is the room's), but the state vector
            # it may take as acks waits for the commit.
            await sam.step1(doc_id)
            shown: Doc[Any] = Doc()
            shown.apply_update(await sam.doc_message(doc_id, SyncStep.STEP2))
            assert "never stored" in notes(shown)
            # The commit fails once the lock outlasts the writer's busy timeout: the room is
            # dropped and both replicas are told to drop their copies.
            for wire in (sam, tina):
                reset = await wire.control("reset", doc=doc_id, timeout=60)
                assert reset["reason"].startswith("storage failure")
            error = await sam.control("error", doc=doc_id, timeout=30)
            assert error["code"] == "storage_unavailable"
            durable = decode_state_vector(await sam.doc_message(doc_id, SyncStep.STEP1))
        assert not covers(durable, writer, upto)
        acks = [c for c in sam.received if c["type"] == "ack" and c["doc"] == doc_id]
        assert not any(covers(ack["clock"], writer, upto) for ack in acks), acks
        # Nothing of it is stored, and the change feed and the head did not move for it.
        assert "never stored" not in notes(await stored_doc(server, doc_id))
        assert await store.head() == head
        page = await store.changes(EVERYTHING, head, 100)
        assert doc_id not in [doc.id for doc in page.docs]


async def test_a_relayed_update_whose_commit_fails_is_dropped_then_sent_again_by_its_author(
    server: Server,
) -> None:
    """The device client on both sides: the receiver drops the copy that held the update that
    was never stored; the author, whose edit no ack covered, applies it again on the server's
    state and sends it; both end with the server's document, the edit stored once."""
    doc_id = "wo:relay-failed"
    async with synced_devices(server, doc_id) as (sam, tina):
        with write_lock_held(server):
            tina.doc(doc_id).get("notes", type=Text).insert(0, "replaced the seal ")
            await eventually(lambda: "replaced the seal" in notes(sam.doc(doc_id)))
            assert tina.pending(doc_id) == 1  # relayed, not acknowledged
            await eventually(lambda: bool(sam.resets and tina.resets), timeout=60)
        assert [r["reason"][:15] for r in sam.resets + tina.resets] == ["storage failure"] * 2
        # Resynced, tina's device applies its edit again on the server's state and sends it.
        await eventually(lambda: "replaced the seal" in notes(tina.doc(doc_id)))
        await tina.wait_acked(doc_id)
        stored = await stored_doc(server, doc_id)
        assert notes(stored).count("replaced the seal") == 1

        def agree() -> bool:
            return all(notes(client.doc(doc_id)) == notes(stored) for client in (sam, tina))

        await eventually(agree)


async def test_a_reassignment_and_what_follows_it_never_reach_the_device_it_moves_out(
    server: Server,
) -> None:
    """The move is fanned out after its commit, once the old assignee is unsubscribed, and so
    is every write applied while it is in flight (here a note sent right after it, while the
    write lock holds the move's commit back)."""
    doc_id = "wo:relay-move"
    async with sam_and_tina(server, doc_id, assignee="tina") as (sam, tina):
        mine = await tina.replica(doc_id)
        theirs = await sam.replica(doc_id)
        with write_lock_held(server):
            before = theirs.get_state()
            theirs.get("fields", type=Map)["assignee"] = "tom"
            await sam.update(doc_id, theirs.get_update(before))
            before = theirs.get_state()
            theirs.get("notes", type=Text).insert(0, "for tom's eyes ")
            await sam.update(doc_id, theirs.get_update(before))
            # Both applied (sam's messages are handled in order) while neither is committed.
            await sam.step1(doc_id)
            shown: Doc[Any] = Doc()
            shown.apply_update(await sam.doc_message(doc_id, SyncStep.STEP2))
            assert "for tom's eyes" in notes(shown)
        await tina.control("scope", timeout=30, removed=[doc_id])
        for _, message in tina.docs:
            if isinstance(message, YSync) and message.step is SyncStep.UPDATE:
                mine.apply_update(message.payload)
        assert mine.get("fields", type=Map)["assignee"] == "tina"
        assert notes(mine) == ""
        stored = await stored_doc(server, doc_id)
        assert stored.get("fields", type=Map)["assignee"] == "tom"


async def test_an_edit_built_on_a_relayed_update_that_was_never_stored_waits_for_it(
    server: Server,
) -> None:
    """tina's edit reaches sam before its commit, sam writes right after it, and both commits
    fail. tina is offline by then: sam alone is reset, and its edit, applied again on the
    server's state, cannot take effect there (it builds on tina's, which the server lacks). It
    stays pending, not forgotten as if acknowledged; once tina is back and her edit is stored,
    sam's follows, and both are in the stored document."""
    doc_id = "wo:relay-chain"
    async with synced_devices(server, doc_id) as (sam, tina):
        with write_lock_held(server):
            tina.doc(doc_id).get("notes", type=Text).insert(0, "[tina]")
            await eventually(lambda: "[tina]" in notes(sam.doc(doc_id)))
            # Offline before her commit fails (the writer's busy timeout): she is not reset.
            await tina.go_offline()
            text = sam.doc(doc_id).get("notes", type=Text)
            text.insert(len("[tina]"), "[sam]")  # right after tina's: it builds on it
            assert sam.pending(doc_id) == 1
            await eventually(lambda: bool(sam.resets), timeout=60)
        await sam.wait_synced(doc_id)
        assert "[tina]" not in notes(await stored_doc(server, doc_id))
        assert sam.pending(doc_id) == 1  # held, not taken for acknowledged
        await tina.start()
        await tina.wait_acked(doc_id)
        await sam.wait_acked(doc_id)
        assert notes(await stored_doc(server, doc_id)) == "[tina][sam]"


@asynccontextmanager
async def synced_devices(server: Server, doc_id: str) -> AsyncIterator[tuple[Client, Client]]:
    """sam's and tina's device clients, both synced on `doc_id` (created durably first)."""
    async with sam_and_tina(server, doc_id):
        pass
    sam, tina = server.client("sam"), server.client("tina")
    try:
        await sam.start()
        await tina.start()
        await sam.wait_synced(doc_id)
        await tina.wait_synced(doc_id)
        yield sam, tina
    finally:
        await sam.close()
        await tina.close()
