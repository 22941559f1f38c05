"""Presence cannot be spoofed: a Yjs client id's awareness state belongs to the connection that
announced it first, until it clears it or leaves; one connection cannot fill a room."""

from __future__ import annotations

from fieldsync.replication import DocMessage, SyncStep, YAwareness
from fieldsync.replication._awareness import (
    MAX_STATES_PER_REPLICA,
    decode_update,
    encode_update,
)
from tests.harness import Server, eventually
from tests.wire import Wire, connect, sam_and_tina

DOC = "wo:presence"


def heard(wire: Wire) -> list[tuple[int, int, str]]:
    """Every awareness entry `wire` received about DOC, in order."""
    return [
        entry
        for doc, y in wire.docs
        if doc == DOC and isinstance(y, YAwareness)
        for entry in decode_update(y.payload)
    ]


async def announce(wire: Wire, *entries: tuple[int, int, str]) -> None:
    await wire.send(DocMessage(DOC, encode_update(list(entries))))


async def join(wire: Wire) -> None:
    await wire.step1(DOC)
    await wire.doc_message(DOC, SyncStep.STEP2)


async def test_another_connection_cannot_change_or_clear_a_state(server: Server) -> None:
    async with sam_and_tina(server, DOC, assignee="tina") as (sam, tina):
        for wire in (sam, tina):
            await join(wire)
        await announce(tina, (42, 1, '{"user":"tina"}'))
        await eventually(lambda: (42, 1, '{"user":"tina"}') in heard(sam))
        # sam, knowing tina's client id, tries to move her cursor, then to make her vanish;
        # and echoes her state back, as every Yjs provider does.
        await announce(sam, (42, 5, '{"user":"mallory"}'), (42, 1, '{"user":"tina"}'))
        await announce(sam, (42, 6, "null"))
        await announce(sam, (43, 1, '{"user":"sam"}'))  # his own: a marker that he was heard
        await eventually(lambda: (43, 1, '{"user":"sam"}') in heard(tina))
        assert [entry for entry in heard(tina) if entry[0] == 42] == []
        # Whoever joins now sees tina as she said she is.
        async with connect(server.sync_url, server.token("ada")) as ada:
            await ada.hello()
            await join(ada)
            await eventually(lambda: {42, 43} <= {client for client, _, _ in heard(ada)})
            assert (42, 1, '{"user":"tina"}') in heard(ada)
            # tina herself may change and clear her state.
            await announce(tina, (42, 2, '{"user":"tina","cursor":3}'))
            await announce(tina, (42, 3, "null"))
            await eventually(lambda: (42, 3, "null") in heard(ada))
            assert (42, 2, '{"user":"tina","cursor":3}') in heard(ada)


async def test_a_client_id_is_free_again_once_its_connection_left(server: Server) -> None:
    async with sam_and_tina(server, DOC, assignee="tina") as (sam, tina):
        await join(sam)
        async with connect(server.sync_url, server.token("mia")) as mia:
            await mia.hello()
            await join(mia)
            await announce(mia, (42, 1, '{"user":"mia"}'))
            await eventually(lambda: (42, 1, '{"user":"mia"}') in heard(sam))
        await eventually(lambda: (42, 2, "null") in heard(sam))  # mia left
        await join(tina)
        await announce(tina, (42, 1, '{"user":"tina"}'))
        await eventually(lambda: (42, 1, '{"user":"tina"}') in heard(sam))


async def test_one_connection_cannot_fill_the_room(server: Server) -> None:
    async with sam_and_tina(server, DOC, assignee="tina") as (sam, tina):
        for wire in (sam, tina):
            await join(wire)
        crowd = [(client, 1, f'{{"n":{client}}}') for client in range(100, 150)]
        await announce(sam, *crowd)
        await announce(sam, (100, 2, '{"n":"moved"}'))  # the ones he holds he may still change
        await announce(tina, (42, 1, '{"user":"tina"}'))
        await eventually(lambda: (42, 1, '{"user":"tina"}') in heard(sam))
        await eventually(lambda: (100, 2, '{"n":"moved"}') in heard(tina))
        assert len({client for client, _, _ in heard(tina)}) == MAX_STATES_PER_REPLICA
