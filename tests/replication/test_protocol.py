"""The `fieldsync.v1` protocol as a device sees it: acks after commit, the changes feed, scopes,
awareness, and the close codes of DESIGN.md §3."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map, Text

from fieldsync.app import ENDPOINTS, REPLICATOR, STORE
from fieldsync.auth import DevIssuer
from fieldsync.client import Client
from fieldsync.errors import CloseCode
from fieldsync.replication import Control, DocMessage, SyncStep, decode_state_vector, encode_sync
from fieldsync.replication._codec import YMessage, write_varbytes
from tests.harness import Server, eventually, running_server, stored_doc, work_order
from tests.wire import Wire, connect


async def create(server: Server, subject: str, doc: Doc[Any], doc_id: str) -> dict[str, Any]:
    async with connect(server.sync_url, server.token(subject)) as wire:
        await wire.hello()
        await wire.update(doc_id, doc.get_update())
        return await wire.control("ack", doc=doc_id)


# --- acks --------------------------------------------------------------------------------


async def test_ack_comes_after_commit_with_the_durable_clock(server: Server) -> None:
    doc = work_order("wo:1")
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:1", doc.get_update())
        ack = await wire.control("ack", doc="wo:1")
        # The ack is only sent once the update is committed: a fresh read of the store sees it.
        stored = await server.app[STORE].load("wo:1")
        assert stored is not None
        assert stored.seq == ack["seq"]
        expected = decode_state_vector(doc.get_state())
        assert ack["clock"] == {str(k): v for k, v in expected.items()}


async def test_a_resent_update_is_acked_and_not_stored_twice(server: Server) -> None:
    doc = work_order("wo:2")
    update = doc.get_update()
    store = server.app[STORE]
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:2", update)
        first = await wire.control("ack", doc="wo:2")
        before = await store.stats()
        await wire.update("wo:2", update)
        again = await wire.control("ack", doc="wo:2")
    assert again["seq"] == first["seq"]
    assert again["clock"] == first["clock"]
    assert (await store.stats())["updates"] == before["updates"]


async def test_a_resent_edit_is_acked_with_the_clock_that_covers_it(server: Server) -> None:
    """A device that reconnected while its edit was still on the way sends it again; the room
    has it already, so the resend adds nothing. Its ack must still cover the edit (an
    incremental edit, whose structs do not start at clock 0), or the device never forgets it."""
    doc = work_order("wo:resent")
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:resent", doc.get_update())
        await wire.control("ack", doc="wo:resent")
        before = doc.get_state()
        doc.get("fields", type=Map)["priority"] = "high"
        edit = doc.get_update(before)
        await wire.update("wo:resent", edit)
        first = await wire.control("ack", doc="wo:resent")
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:resent", edit)
        again = await wire.control("ack", doc="wo:resent")
    mine = str(doc.client_id)
    assert (
        again["clock"][mine]
        == first["clock"][mine]
        == decode_state_vector(doc.get_state())[doc.client_id]
    )


async def test_each_pipelined_update_is_acked_in_order_with_its_own_clock(
    server: Server,
) -> None:
    doc = work_order("wo:3")
    fields = doc.get("fields", type=Map)
    updates = [doc.get_update()]
    clocks = [decode_state_vector(doc.get_state())]
    for i in range(50):
        state = doc.get_state()
        fields[f"k{i}"] = i
        updates.append(doc.get_update(state))
        clocks.append(decode_state_vector(doc.get_state()))
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        for update in updates:
            await wire.update("wo:3", update)
        acks = [await wire.control("ack", doc="wo:3") for _ in updates]
    seqs = [ack["seq"] for ack in acks]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    # Each ack names exactly what its update made durable: no more (later updates may still be
    # in flight), no less.
    for ack, clock in zip(acks, clocks, strict=True):
        assert ack["clock"] == {str(client): value for client, value in clock.items()}


async def test_an_edit_to_a_document_many_devices_wrote_is_acked_with_its_own_clock_only(
    server: Server,
) -> None:
    """Every start of an app writes with a new Yjs client id, so a work order collects hundreds
    over its life; the ack still names exactly the client the edit advanced."""
    doc = work_order("wo:many")
    for n in range(300):
        device: Doc[Any] = Doc(client_id=1_000_003 * (n + 1))
        device.apply_update(doc.get_update())
        state = device.get_state()
        device.get("fields", type=Map)[f"device{n}"] = n
        doc.apply_update(device.get_update(state))
    every = decode_state_vector(doc.get_state())
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:many", doc.get_update())
        created = await wire.control("ack", doc="wo:many")
        state = doc.get_state()
        doc.get("fields", type=Map)["priority"] = "high"
        await wire.update("wo:many", doc.get_update(state))
        edited = await wire.control("ack", doc="wo:many")
    assert len(created["clock"]) == len(every) == 301
    assert created["clock"] == {str(client): clock for client, clock in every.items()}
    mine = decode_state_vector(doc.get_state())[doc.client_id]
    assert (
        edited["clock"] == {str(doc.client_id): mine} != {str(doc.client_id): every[doc.client_id]}
    )


# --- the changes feed --------------------------------------------------------------------


async def test_changes_pages_list_every_document_in_scope_once(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    async with running_server(tmp_path, issuer, changes_page=4) as server:
        for n in range(11):
            await create(server, "sam", work_order(f"wo:{n}"), f"wo:{n}")
        await create(server, "sue", work_order("wo:s1", team="south", region="west"), "wo:s1")
        async with connect(server.sync_url, server.token("sam")) as wire:
            welcome = await wire.hello()
            pages: list[dict[str, Any]] = []
            while not pages or pages[-1]["more"]:
                pages.append(await wire.control("changes"))
    assert [len(p["docs"]) for p in pages] == [4, 4, 3]
    ids = [d["id"] for p in pages for d in p["docs"]]
    assert sorted(ids) == sorted(f"wo:{n}" for n in range(11))
    for earlier, later in itertools.pairwise(pages):
        assert later["since"] == earlier["upto"]
    assert pages[-1]["upto"] == welcome["server_seq"]


async def test_changes_since_lists_only_what_changed_after(server: Server) -> None:
    first = await create(server, "sam", work_order("wo:a"), "wo:a")
    await create(server, "sam", work_order("wo:b"), "wo:b")
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello(since=first["seq"])
        page = await wire.control("changes")
    assert [d["id"] for d in page["docs"]] == ["wo:b"]


@pytest.mark.parametrize(
    ("subject", "visible"),
    [
        ("tina", {"wo:t1"}),
        ("tom", {"wo:t2"}),
        ("ulla", {"wo:u1"}),
        ("sam", {"wo:t1", "wo:t2"}),
        ("mia", {"wo:t1", "wo:t2"}),
        ("ada", {"wo:t1", "wo:t2", "wo:u1"}),
        ("nobody", set()),
    ],
)
async def test_scope_decides_what_a_principal_sees(
    server: Server, subject: str, visible: set[str]
) -> None:
    await create(server, "sam", work_order("wo:t1", assignee="tina"), "wo:t1")
    await create(server, "sam", work_order("wo:t2", assignee="tom"), "wo:t2")
    await create(
        server, "sue", work_order("wo:u1", assignee="ulla", team="south", region="west"), "wo:u1"
    )
    async with connect(server.sync_url, server.token(subject)) as wire:
        await wire.hello()
        page = await wire.control("changes")
        assert {d["id"] for d in page["docs"]} == visible
        creates = subject in ("sam", "mia", "ada")  # roles that may create work orders
        for doc_id in ("wo:t1", "wo:t2", "wo:u1"):
            await wire.step1(doc_id)
            if doc_id in visible:
                assert await wire.doc_message(doc_id, SyncStep.STEP2) != b"\x00\x00"
            elif creates:
                # Looks absent, as an id that does not exist would: an empty document.
                assert await wire.doc_message(doc_id, SyncStep.STEP2) == b"\x00\x00"
            else:
                error = await wire.control("error", doc=doc_id)
                assert error["code"] == "forbidden"
        # Not one byte of a document outside the scope: empty syncs and state vectors at most.
        outside = [y for doc, y in wire.docs if doc not in visible]
        assert all(y.payload in (b"\x00\x00", b"\x00") for y in outside)


async def test_forms_follow_their_work_order(server: Server) -> None:
    await create(server, "sam", work_order("wo:f1", assignee="tina"), "wo:f1")
    form: Doc[Any] = Doc()
    from fieldsync import documents

    documents.form.write(form, "wo:f1", "safety-check", 1, {"gloves": True})
    ack = await create(server, "tina", form, "form:f1")
    assert ack["seq"] > 0
    other: Doc[Any] = Doc()
    documents.form.write(other, "wo:f1", "safety-check", 1, {"gloves": True})
    async with connect(server.sync_url, server.token("ulla")) as wire:
        await wire.hello()
        await wire.update("form:f2", other.get_update())
        error = await wire.control("error", doc="form:f2")
        assert error["code"] == "forbidden"
        await wire.control("reset", doc="form:f2")
    assert await server.app[STORE].index("form:f2") is None


async def test_a_batch_of_step_1s_is_answered_document_by_document(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """A device offering many documents in one BATCH (their rooms loaded from storage together)
    gets each document it may see, and is refused each other one, as if it had asked alone."""
    async with running_server(tmp_path, issuer, max_rooms=1) as server:
        mine = [f"wo:b{n}" for n in range(5)]
        for doc_id in mine:
            await create(server, "sam", work_order(doc_id, assignee="tina"), doc_id)
        south = work_order("wo:south", assignee="ulla", team="south", region="west")
        await create(server, "ada", south, "wo:south")
        await eventually(lambda: not server.app[ENDPOINTS].connections)
        server.app[REPLICATOR].evict()  # served from storage, as after a restart
        asked = ["wo:south", *mine, "wo:absent", "not a doc id"]
        async with connect(server.sync_url, server.token("tina")) as wire:
            await wire.hello()
            await wire.send(*(DocMessage(d, encode_sync(SyncStep.STEP1, b"\x00")) for d in asked))
            for doc_id in mine:
                doc: Doc[Any] = Doc()
                doc.apply_update(await wire.doc_message(doc_id, SyncStep.STEP2))
                number = doc_id.split(":", 1)[1]
                assert doc.get("fields", type=Map).to_py()["number"] == number
                await wire.doc_message(doc_id, SyncStep.STEP1)
            for doc_id in ("wo:south", "wo:absent"):
                assert (await wire.control("error", doc=doc_id))["code"] == "forbidden"
            assert (await wire.control("error", doc="not a doc id"))["code"] == "invalid_doc_id"
            assert not [d for d, _ in wire.docs if d in ("wo:south", "wo:absent")]


async def test_technicians_cannot_create_work_orders(server: Server) -> None:
    async with connect(server.sync_url, server.token("tina")) as wire:
        await wire.hello()
        await wire.update("wo:x", work_order("wo:x").get_update())
        assert (await wire.control("error", doc="wo:x"))["code"] == "forbidden"
    assert await server.app[STORE].index("wo:x") is None


async def test_reassignment_moves_the_work_order_between_devices(server: Server) -> None:
    await create(server, "sam", work_order("wo:r", assignee="tina"), "wo:r")
    async with (
        connect(server.sync_url, server.token("tina")) as tina,
        connect(server.sync_url, server.token("tom")) as tom,
        connect(server.sync_url, server.token("sam")) as sam,
    ):
        for wire in (tina, tom, sam):
            await wire.hello()
        await tina.step1("wo:r")
        state = await tina.doc_message("wo:r", SyncStep.STEP2)
        await sam.step1("wo:r")
        sam_doc: Doc[Any] = Doc()
        sam_doc.apply_update(await sam.doc_message("wo:r", SyncStep.STEP2))
        before = sam_doc.get_state()
        sam_doc.get("fields", type=Map)["assignee"] = "tom"
        await sam.update("wo:r", sam_doc.get_update(before))
        assert (await tina.control("scope"))["removed"] == ["wo:r"]
        assert (await tom.control("scope"))["added"] == ["wo:r"]
        # The old assignee's later edits are refused and never stored.
        tina_doc: Doc[Any] = Doc()
        tina_doc.apply_update(state)
        before = tina_doc.get_state()
        tina_doc.get("notes", type=Text).insert(0, "late edit")
        await tina.update("wo:r", tina_doc.get_update(before))
        assert (await tina.control("error", doc="wo:r"))["code"] == "forbidden"
    stored = await stored_doc(server, "wo:r")
    assert str(stored.get("notes", type=Text)) == ""


async def test_awareness_is_relayed_and_never_stored(server: Server) -> None:
    await create(server, "sam", work_order("wo:aw", assignee="tina"), "wo:aw")
    store = server.app[STORE]
    before = (await store.stats())["updates"]
    awareness = bytes([YMessage.AWARENESS]) + write_varbytes(b"\x01\x07\x01\x02{}")
    async with (
        connect(server.sync_url, server.token("tina")) as tina,
        connect(server.sync_url, server.token("sam")) as sam,
    ):
        for wire in (tina, sam):
            await wire.hello()
            await wire.step1("wo:aw")
            await wire.doc_message("wo:aw", SyncStep.STEP2)
        await tina.send(DocMessage("wo:aw", awareness))
        await eventually(lambda: any(doc == "wo:aw" and y for doc, y in sam.docs))
    assert (await store.stats())["updates"] == before


# --- close codes -------------------------------------------------------------------------


async def test_invalid_token_closes_4401_reauthenticate(server: Server) -> None:
    async with connect(server.sync_url, "not-a-token") as wire:
        assert await wire.closed_with() == (CloseCode.UNAUTHORIZED, "reauthenticate")


async def test_expired_token_closes_4401_token_expired(server: Server) -> None:
    token = server.token("tina", ttl=-300)
    async with connect(server.sync_url, token) as wire:
        assert await wire.closed_with() == (CloseCode.UNAUTHORIZED, "token_expired")


async def test_token_expiring_on_an_open_socket(server: Server) -> None:
    async with connect(server.sync_url, server.token("tina", ttl=2)) as wire:
        welcome = await wire.hello()
        notice = await wire.control("auth_expiring")
        assert notice["at"] == welcome["token_expires_at"]
        assert await wire.closed_with(timeout=5) == (CloseCode.UNAUTHORIZED, "token_expired")


async def test_in_band_renewal_keeps_the_socket_and_another_subject_is_refused(
    server: Server,
) -> None:
    async with connect(server.sync_url, server.token("tina", ttl=2)) as wire:
        await wire.hello()
        await wire.send(Control({"type": "auth", "token": server.token("tina")}))
        await wire.control("changes")
        await wire.send(Control({"type": "auth", "token": server.token("tom")}))
        assert await wire.closed_with() == (CloseCode.UNAUTHORIZED, "reauthenticate")


async def test_browser_token_in_first_message(server: Server) -> None:
    async with connect(server.sync_url, None) as wire:
        await wire.send(
            Control({"type": "hello", "client": {}, "since": 0, "token": server.token("tina")})
        )
        assert (await wire.control("welcome"))["server_seq"] == 0


async def test_no_authentication_in_time_closes_4408(tmp_path: Path, issuer: DevIssuer) -> None:
    async with (
        running_server(tmp_path, issuer, auth_timeout=0.3) as server,
        connect(server.sync_url, None) as wire,
    ):
        assert await wire.closed_with() == (CloseCode.AUTH_TIMEOUT, "auth_timeout")


async def test_old_client_closes_4426(tmp_path: Path, issuer: DevIssuer) -> None:
    async with (
        running_server(tmp_path, issuer, min_client_versions={"ios": "2.4.0"}) as server,
        connect(server.sync_url, server.token("tina")) as wire,
    ):
        await wire.send(
            Control({"type": "hello", "client": {"platform": "ios", "version": "2.3.9"}})
        )
        assert await wire.closed_with() == (CloseCode.UPGRADE_REQUIRED, "client_upgrade_required")


async def test_frame_over_the_limit_closes_4413(tmp_path: Path, issuer: DevIssuer) -> None:
    async with (
        running_server(tmp_path, issuer, max_frame=1024) as server,
        connect(server.sync_url, server.token("tina")) as wire,
    ):
        await wire.hello()
        await wire.send_raw(b"\x00" + b"\x01" * 1100)
        code, _ = await wire.closed_with()
        assert code == CloseCode.FRAME_TOO_LARGE


async def test_flooding_closes_4429(tmp_path: Path, issuer: DevIssuer) -> None:
    async with (
        running_server(tmp_path, issuer, rate=10.0, burst=20.0) as server,
        connect(server.sync_url, server.token("tina")) as wire,
    ):
        await wire.hello()
        for _ in range(40):
            if wire.closed:
                break
            await wire.send(Control({"type": "ping"}))
        assert await wire.closed_with() == (CloseCode.RATE_LIMITED, "rate_limited")


async def test_garbage_closes_4400_and_others_keep_syncing(server: Server) -> None:
    await create(server, "sam", work_order("wo:g", assignee="tina"), "wo:g")
    async with (
        connect(server.sync_url, server.token("tina")) as bad,
        connect(server.sync_url, server.token("sam")) as good,
    ):
        await bad.hello()
        await good.hello()
        await bad.send_raw(b"\x00\x07garbage")
        assert (await bad.closed_with())[0] == CloseCode.PROTOCOL_ERROR
        doc = work_order("wo:g2")
        await good.update("wo:g2", doc.get_update())
        assert (await good.control("ack", doc="wo:g2"))["seq"] > 0


async def test_a_bad_update_gets_an_error_and_the_connection_lives(server: Server) -> None:
    await create(server, "sam", work_order("wo:bad", assignee="tina"), "wo:bad")
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:bad", b"\x01\x02\x03garbage")
        assert (await wire.control("error", doc="wo:bad"))["code"] == "invalid_update"
        await wire.send(DocMessage("not a doc id", b"\x00\x00\x01\x00"))
        assert (await wire.control("error"))["code"] == "invalid_doc_id"
        await wire.step1("wo:bad")
        assert await wire.doc_message("wo:bad", SyncStep.STEP2)


async def test_draining_closes_4503(tmp_path: Path, issuer: DevIssuer) -> None:
    async with running_server(tmp_path, issuer) as server:
        wire_cm = connect(server.sync_url, server.token("tina"))
        wire: Wire = await wire_cm.__aenter__()
        await wire.hello()
    assert await wire.closed_with() == (CloseCode.DRAINING, "draining")
    # Told first, with when to come back: spread, so a node's devices do not all reconnect at once.
    told = await wire.control("error", code="draining")
    assert 1 <= told["retry_after"] <= 5
    await wire_cm.__aexit__(None, None, None)


async def test_a_late_joiner_sees_presence_and_a_dropped_replica_is_announced_gone(
    server: Server,
) -> None:
    from fieldsync.replication._awareness import decode_update

    await create(server, "sam", work_order("wo:pr", assignee="tina"), "wo:pr")
    here = bytes([YMessage.AWARENESS]) + write_varbytes(
        b"\x01\x2a\x03" + write_varbytes(b'{"user":"tina"}')
    )

    def presence(wire: Wire) -> list[tuple[int, int, str]]:
        return [
            entry
            for doc, y in wire.docs
            if doc == "wo:pr" and not hasattr(y, "step")
            for entry in decode_update(y.payload)
        ]

    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        async with connect(server.sync_url, server.token("tina")) as tina:
            await tina.hello()
            await tina.step1("wo:pr")
            await tina.doc_message("wo:pr", SyncStep.STEP2)
            await tina.send(DocMessage("wo:pr", here))
            await sam.step1("wo:pr")  # joins after tina announced herself
            await eventually(lambda: (42, 3, '{"user":"tina"}') in presence(sam))
        # tina's socket is gone without a goodbye: sam hears she left.
        await eventually(lambda: (42, 4, "null") in presence(sam))


async def test_presence_on_a_document_that_does_not_exist_yet_waits_for_it(
    server: Server,
) -> None:
    """A device may announce itself on a document it is about to create: no error, no reset;
    its presence is heard once the document exists."""
    from fieldsync.replication._awareness import decode_update

    here = bytes([YMessage.AWARENESS]) + write_varbytes(
        b"\x01\x2a\x01" + write_varbytes(b'{"user":"sam"}')
    )
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await sam.step1("wo:soon")
        assert await sam.doc_message("wo:soon", SyncStep.STEP2) == b"\x00\x00"
        await sam.send(DocMessage("wo:soon", here))
        await sam.update("wo:soon", work_order("wo:soon", assignee="tina").get_update())
        await sam.control("ack", doc="wo:soon")
        assert [c for c in sam.received if c["type"] in ("error", "reset")] == []
        async with connect(server.sync_url, server.token("tina")) as tina:
            await tina.hello()
            await tina.step1("wo:soon")
            await eventually(
                lambda: any(
                    (42, 1, '{"user":"sam"}') in decode_update(y.payload)
                    for doc, y in tina.docs
                    if doc == "wo:soon" and not hasattr(y, "step")
                )
            )


async def test_a_device_opening_a_work_order_before_it_exists_waits_for_it(
    server: Server,
) -> None:
    """A supervisor's device opens an id its colleague is about to create (the device answers the
    server's SyncStep1 with an empty SyncStep2): it is not taken for a creation outside the
    scope, no error, no reset; the work order reaches it once created."""
    early, creator = server.client("sam"), server.client("sam")
    try:
        await early.start()
        await early.connected.wait()
        early.doc("wo:later")
        await creator.start()
        creator.doc("wo:later").apply_update(
            work_order("wo:later", title="Pump 4 seal").get_update()
        )
        await creator.wait_acked("wo:later")

        def title() -> object:
            return early.doc("wo:later").get("fields", type=Map).to_py().get("title")

        await eventually(lambda: title() == "Pump 4 seal")
        assert (early.errors, early.resets, early.rejected) == ([], [], [])
    finally:
        await early.close()
        await creator.close()


async def test_peers_creating_one_document_at_once_all_converge(server: Server) -> None:
    """Several replicas wait for a document that does not exist yet, then all write its first
    updates at once: each ends with every update (the creator's included)."""
    subjects = ("sam", "mia", "ada")
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("mia")) as mia,
        connect(server.sync_url, server.token("ada")) as ada,
    ):
        wires = (sam, mia, ada)
        replicas: list[Doc[Any]] = []
        for wire in wires:
            await wire.hello()
            await wire.step1("wo:race")
            await wire.doc_message("wo:race", SyncStep.STEP2)
        for subject, wire in zip(subjects, wires, strict=True):
            doc = work_order("wo:race", title=f"by {subject}")
            replicas.append(doc)
            await wire.update("wo:race", doc.get_update())
        for wire in wires:
            await wire.control("ack", doc="wo:race")
        whole = await stored_doc(server, "wo:race")
        want = decode_state_vector(whole.get_state())

        def caught_up(wire: Wire, doc: Doc[Any]) -> bool:
            for item in [d for d in wire.docs if d[0] == "wo:race"]:
                wire.docs.remove(item)
                if hasattr(item[1], "payload") and item[1].step is not SyncStep.STEP1:
                    doc.apply_update(item[1].payload)
            return decode_state_vector(doc.get_state()) == want

        for wire, doc in zip(wires, replicas, strict=True):
            await eventually(lambda wire=wire, doc=doc: caught_up(wire, doc))


async def test_a_client_whose_token_is_not_renewed_yet_does_not_answer_each_notice(
    server: Server,
) -> None:
    """A token source that caches its token (renewed later, by its own schedule) gives the same
    token back on `auth_expiring`: sent again, the server would answer with the same notice at
    once, in a loop. The client sends it only once it changed."""
    cached = server.token("sam", ttl=60)  # inside the notice period from the start
    asked = 0

    async def token() -> str:
        nonlocal asked
        asked += 1
        return cached

    device = Client(server.sync_url, token)
    try:
        await device.start()
        doc_id = "wo:token-loop"
        device.doc(doc_id).apply_update(work_order(doc_id).get_update())
        await device.wait_acked(doc_id)  # round trips a loop would have filled
        assert asked <= 2, f"the token source was asked {asked} times"
    finally:
        await device.close()
