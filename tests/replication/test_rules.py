"""Domain rules on the merged state, through real devices: the server corrects what may not
stand, every replica converges on the correction, and the author is told why."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.app import STORE
from fieldsync.auth import DevIssuer
from fieldsync.client import Client
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import Replicator, SyncStep
from fieldsync.storage import SQLiteBackend
from tests.harness import Replica, Server, eventually, running_server, stored_doc, work_order
from tests.wire import connect, sam_and_tina


def log_of(doc: Doc[Any]) -> list[dict[str, Any]]:
    return doc.get("status_log", type=Array).to_py() or []


def status_is(value: str) -> Callable[[Doc[Any]], bool]:
    return lambda doc: doc.get("fields", type=Map)["status"] == value


async def test_an_illegal_transition_is_reverted_everywhere(server: Server) -> None:
    async with sam_and_tina(server, "wo:r1", status="assigned") as (sam, tina):
        mine = await tina.replica("wo:r1")
        theirs = await sam.replica("wo:r1")
        # assigned → closed: not a technician's to make.
        await tina.move("wo:r1", mine, "closed", "tina", "technician")
        await tina.control("ack", doc="wo:r1")
        error = await tina.control("error", doc="wo:r1")
        assert (error["code"], error["rule"]) == ("rule_violation", "status_transition")
        await tina.follow("wo:r1", mine, status_is("assigned"))
        await sam.follow("wo:r1", theirs, status_is("assigned"))
        # The entry is kept, marked with the reason.
        assert (
            log_of(mine)[-1]["rejected"]
            == "assigned → closed is not allowed for the technician role"
        )
        # Writing the field without a log entry moves nothing either.
        await tina.edit("wo:r1", mine, status="en_route")
        error = await tina.control("error", doc="wo:r1")
        assert error["rule"] == "status_transition"
        assert "status_log" in error["detail"]
        await tina.follow("wo:r1", mine, status_is("assigned"))
        # A legal step goes through untouched.
        await tina.move("wo:r1", mine, "en_route", "tina", "technician")
        await tina.control("ack", doc="wo:r1")
        await sam.follow("wo:r1", theirs, status_is("en_route"))
    store = server.app[STORE]
    conflicts = await store.conflicts(ScopeFilter(ScopeKind.TEAM, "north"), None, 10)
    assert [(c.conflict.rule, c.conflict.actor) for c in conflicts] == [
        ("status_transition", "tina"),
        ("status_transition", "tina"),
    ]
    # A conflict names the device whose update was corrected; the correction is the rules' own.
    assert {c.conflict.origin.kind for c in conflicts} == {OriginKind.DEVICE}
    status = await store.history("wo:r1", "fields.status", None, 10)
    assert [e.origin for e in status if e.change.new == "assigned"][:2] == [
        Origin(OriginKind.RULES)
    ] * 2


async def test_the_rules_never_judge_their_own_corrections(tmp_path: Path) -> None:
    """What the rules wrote is not judged by them again, or a correction could chase itself:
    the same update that is put back when a device sends it stands when its origin is the
    rules' (as when another node relays a correction it made)."""
    backend = SQLiteBackend(tmp_path / "db.sqlite")
    await backend.open()
    replicator = Replicator(backend.store)
    device, rules = Replica("sam"), Replica("sam", Origin(OriginKind.RULES))
    try:
        for doc_id, writer in (("wo:own1", device), ("wo:own2", rules)):
            room = await replicator.subscribe(writer, doc_id)
            created = work_order(doc_id, status="assigned").get_update()
            writer.doc.apply_update(created)
            await replicator.submit(writer, room, created)
            # The status field written without a status_log entry: a rule puts it back.
            await replicator.submit(writer, room, writer.edit("status", "closed"))
            if room.tail is not None:
                await room.tail
        assert status_is("assigned")(device.doc)
        assert status_is("closed")(rules.doc)
        assert (device.violations, rules.violations) == ([("wo:own1", "status_transition")], [])
    finally:
        await replicator.stop()
        await backend.close()


async def test_log_entries_are_appended_in_the_writers_own_name(server: Server) -> None:
    """A technician may not rewrite the status history: not claim another's name or role, not
    change or delete an entry. Such an update is refused whole; nothing of it is kept."""
    async with sam_and_tina(server, "wo:r6", status="assigned") as (_sam, tina):
        attempts: list[Callable[[Doc[Any]], None]] = [
            lambda d: documents.work_order.set_status(d, "closed", by="tina", role="supervisor"),
            lambda d: documents.work_order.set_status(d, "en_route", by="sam", role="supervisor"),
            lambda d: d.get("status_log", type=Array)[0].__setitem__("status", "closed"),
            lambda d: d.get("status_log", type=Array).__delitem__(0),
            lambda d: documents.work_order.record_meter_reading(d, 5, by="tom"),
        ]
        for attempt in attempts:
            mine = await tina.replica("wo:r6")
            before = mine.get_state()
            attempt(mine)
            await tina.update("wo:r6", mine.get_update(before))
            error = await tina.control("error", doc="wo:r6")
            assert error["code"] == "forbidden_field", error
            await tina.control("reset", doc="wo:r6")
    doc = await stored_doc(server, "wo:r6")
    assert [e["status"] for e in log_of(doc)] == ["assigned"]
    assert doc.get("fields", type=Map)["status"] == "assigned"


async def test_a_supervisors_cancel_dominates_an_offline_completion(server: Server) -> None:
    """Both orders: the completion arriving first, and the cancel arriving first."""
    for first in ("tina", "sam"):
        doc_id = f"wo:cancel-{first}"
        async with sam_and_tina(server, doc_id, status="in_progress") as (sam, tina):
            tech = await tina.replica(doc_id)
            boss = await sam.replica(doc_id)
            # Both edit without seeing each other's edit (tina offline, say).
            before_t, before_s = tech.get_state(), boss.get_state()
            tech.get("checklist", type=Array)[0]["done"] = True
            documents.work_order.set_status(tech, "completed", by="tina", role="technician")
            documents.work_order.set_status(boss, "cancelled", by="sam", role="supervisor")
            completion, cancel = tech.get_update(before_t), boss.get_update(before_s)
            writes = [(tina, completion), (sam, cancel)]
            for wire, update in writes if first == "tina" else reversed(writes):
                await wire.update(doc_id, update)
                await wire.control("ack", doc=doc_id)
            # The correction is committed after the ack of the update it corrects: the next
            # update either side receives is it.
            await sam.follow(
                doc_id,
                boss,
                lambda d: (
                    d.get("fields", type=Map)["status"] == "cancelled"
                    and d.get("checklist", type=Array)[0]["done"] is True
                ),
            )
            async with connect(server.sync_url, server.token("ada")) as ada:
                await ada.hello()
                stored = await ada.replica(doc_id)
            fields = stored.get("fields", type=Map)
            assert fields["status"] == "cancelled", first
            # The technician's work is kept.
            assert stored.get("checklist", type=Array)[0]["done"] is True


async def test_completion_needs_the_required_checklist(server: Server) -> None:
    async with connect(server.sync_url, server.token("tina")) as tina:
        async with connect(server.sync_url, server.token("sam")) as sam:
            await sam.hello()
            await sam.update("wo:r3", work_order("wo:r3", status="in_progress").get_update())
            await sam.control("ack", doc="wo:r3")
        await tina.hello()
        mine = await tina.replica("wo:r3")
        await tina.move("wo:r3", mine, "completed", "tina", "technician")
        await tina.control("ack", doc="wo:r3")
        error = await tina.control("error", doc="wo:r3")
        assert error["rule"] == "completion_requirements"
        assert "Check seals" in error["detail"]
        await tina.follow("wo:r3", mine, status_is("in_progress"))
        assert "Check seals" in log_of(mine)[-1]["rejected"]
        # Tick the item: the completion the log holds now stands, its mark is cleared.
        before = mine.get_state()
        mine.get("checklist", type=Array)[0]["done"] = True
        await tina.update("wo:r3", mine.get_update(before))
        await tina.control("ack", doc="wo:r3")
        await tina.follow("wo:r3", mine, status_is("completed"))
    doc = await stored_doc(server, "wo:r3")
    assert doc.get("fields", type=Map)["status"] == "completed"
    assert not any("rejected" in e for e in log_of(doc))


async def test_meter_readings_never_decrease_and_time_entries_never_overlap(
    server: Server,
) -> None:
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
    ):
        await sam.hello()
        await tina.hello()
        await sam.update(
            "wo:r4", work_order("wo:r4", status="in_progress", meter_reading=1200).get_update()
        )
        await sam.control("ack", doc="wo:r4")
        boss = await sam.replica("wo:r4")
        # Written without a log entry: the field shows the log's reading again.
        await sam.edit("wo:r4", boss, meter_reading=1100)
        assert (await sam.control("error", doc="wo:r4"))["rule"] == "meter_never_decreases"
        # The edit's own ack (it follows the error): taken here, it cannot pass later for the
        # ack of the time entry below.
        await sam.control("ack", doc="wo:r4")
        await sam.follow(
            "wo:r4", boss, lambda d: d.get("fields", type=Map)["meter_reading"] == 1200
        )
        # Logged: kept, marked, and the field keeps the highest reading.
        reading = await tina.replica("wo:r4")
        before = reading.get_state()
        documents.work_order.record_meter_reading(reading, 1150, by="tina")
        await tina.update("wo:r4", reading.get_update(before))
        error = await tina.control("error", doc="wo:r4")
        assert (error["rule"], error["detail"]) == (
            "meter_never_decreases",
            "meter reading 1150 is below the one recorded before it, 1200",
        )
        await tina.follow(
            "wo:r4", reading, lambda d: d.get("fields", type=Map)["meter_reading"] == 1200
        )
        readings = reading.get("meter_readings", type=Array).to_py()
        assert [(r["value"], "rejected" in r) for r in readings] == [(1200, False), (1150, True)]

        # A supervisor logs tom's time (a technician logs its own only).
        boss = await sam.replica("wo:r4")
        before = boss.get_state()
        boss.get("time_entries", type=Array).append(Map({"by": "tom", "start": 150, "end": 250}))
        await sam.update("wo:r4", boss.get_update(before))
        await sam.control("ack", doc="wo:r4")
        mine = await tina.replica("wo:r4")
        before = mine.get_state()
        entries = mine.get("time_entries", type=Array)
        entries.append(Map({"by": "tina", "start": 100, "end": 200}))
        entries.append(Map({"by": "tina", "start": 150, "end": 250}))  # overlaps the first
        await tina.update("wo:r4", mine.get_update(before))
        assert (await tina.control("error", doc="wo:r4"))["rule"] == "time_entries_overlap"

        def marked(doc: Doc[Any]) -> bool:
            return any("rejected" in e for e in doc.get("time_entries", type=Array).to_py())

        await tina.follow("wo:r4", mine, marked)
        entries = mine.get("time_entries", type=Array).to_py()
        assert [(e["by"], e["start"], "rejected" in e) for e in entries] == [
            ("tom", 150, False),  # another technician's: no overlap with tina's
            ("tina", 100, False),
            ("tina", 150, True),  # kept, marked: nothing a technician logged is lost
        ]


async def test_form_answers_are_checked_and_block_completion_until_fixed(server: Server) -> None:
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
    ):
        await sam.hello()
        await tina.hello()
        wo = work_order("wo:r5", status="in_progress")
        wo.get("checklist", type=Array)[0]["done"] = True
        await sam.update("wo:r5", wo.get_update())
        await sam.control("ack", doc="wo:r5")

        form: Doc[Any] = Doc()
        answers = {"permit_number": "PTW-1", "hazards": "volcano", "lockout_tagout": True}
        documents.form.write(form, "wo:r5", "safety-check", 1, answers)
        await tina.update("form:r5", form.get_update())
        await tina.control("ack", doc="form:r5")
        # The server marks what is wrong or missing; the answers themselves stay.
        await tina.step1("form:r5")
        form.apply_update(await tina.doc_message("form:r5", SyncStep.STEP2))
        marks = form.get("validation", type=Map).to_py()
        assert marks["hazards"].startswith("not one of")
        assert marks["ppe_checked"] == "required"
        assert form.get("answers", type=Map)["hazards"] == "volcano"

        mine = await tina.replica("wo:r5")
        await tina.move("wo:r5", mine, "completed", "tina", "technician")
        await tina.control("ack", doc="wo:r5")
        error = await tina.control("error", doc="wo:r5")
        assert error["rule"] == "completion_requirements"
        assert "form:r5" in error["detail"]
        await tina.follow("wo:r5", mine, status_is("in_progress"))

        # Fixing the form lets the completion the log holds stand: the work order is judged
        # again when its form changes, so which document's update came first does not matter.
        before = form.get_state()
        form.get("answers", type=Map).update({"hazards": "electrical", "ppe_checked": True})
        await tina.update("form:r5", form.get_update(before))
        await tina.control("ack", doc="form:r5")
        await tina.follow("form:r5", form, lambda d: not d.get("validation", type=Map).to_py())
        await tina.follow("wo:r5", mine, status_is("completed"))
    doc = await stored_doc(server, "wo:r5")
    assert doc.get("fields", type=Map)["status"] == "completed"


async def test_every_field_change_is_in_the_history_with_its_author(server: Server) -> None:
    async with sam_and_tina(server, "wo:h1", status="assigned") as (sam, tina):
        theirs = await sam.replica("wo:h1")
        await sam.edit("wo:h1", theirs, due_at="2026-12-24")
        await sam.control("ack", doc="wo:h1")
        mine = await tina.replica("wo:h1")
        await tina.move("wo:h1", mine, "en_route", "tina", "technician")
        ack = await tina.control("ack", doc="wo:h1")
    store = server.app[STORE]
    due = await store.history("wo:h1", "fields.due_at", None, 10)
    assert [(e.actor, e.change.old, e.change.new) for e in due] == [("sam", None, "2026-12-24")]
    status = await store.history("wo:h1", "fields.status", None, 10)
    assert (status[0].actor, status[0].change.old, status[0].change.new) == (
        "tina",
        "assigned",
        "en_route",
    )
    assert status[0].seq == ack["seq"]
    assert status[0].origin.kind is OriginKind.DEVICE
    everything = await store.history("wo:h1", None, None, 100)
    assert {"fields.title", "checklist", "fields.status"} <= {e.change.path for e in everything}
    newest = everything[0]
    older = await store.history("wo:h1", None, (newest.seq, newest.id), 100)
    assert older == everything[1:]


async def test_a_device_back_after_the_offline_contract_resyncs_and_keeps_its_work(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    # A contract of a few microseconds: every reconnect comes "too late".
    async with running_server(tmp_path / "srv", issuer, max_offline_days=1e-10) as server:
        sam = server.client("sam", path=tmp_path / "sam.db")
        await sam.start()
        sam.doc("wo:o1").apply_update(work_order("wo:o1", status="in_progress").get_update())
        await sam.wait_acked()
        tina = server.client("tina", path=tmp_path / "tina.db")
        await tina.start()
        await tina.wait_synced("wo:o1")
        await tina.go_offline()
        tina.doc("wo:o1").get("notes", type=Text).insert(0, "replaced the seal")
        assert tina.pending("wo:o1") == 1
        await tina.start()
        await tina.wait_acked("wo:o1")
        assert [r["reason"] for r in tina.resets] == ["offline_too_long"]
        doc = await stored_doc(server, "wo:o1")
        assert str(doc.get("notes", type=Text)) == "replaced the seal"
        await tina.close()
        await sam.close()


async def test_real_devices_offline_converge_on_the_rules_outcome(
    tmp_path: Path, server: Server
) -> None:
    """Through `fieldsync.client`: tina completes a work order offline while sam, offline too,
    cancels it; both come back at once. Every replica ends cancelled with tina's work kept, and
    the devices log their moves in the name the server's `welcome` gave them."""
    sam = server.client("sam", path=tmp_path / "sam.db")
    tina = server.client("tina", path=tmp_path / "tina.db")
    await sam.start()
    sam.doc("wo:d1").apply_update(work_order("wo:d1", status="in_progress").get_update())
    await sam.wait_acked()
    await tina.start()
    await tina.wait_synced("wo:d1")
    assert (tina.subject, tina.roles, sam.roles) == ("tina", ["technician"], ["supervisor"])
    await tina.go_offline()
    await sam.go_offline()

    mine, theirs = tina.doc("wo:d1"), sam.doc("wo:d1")
    mine.get("checklist", type=Array)[0]["done"] = True
    for status in ("on_hold", "in_progress", "completed"):
        documents.work_order.set_status(mine, status, by="tina", role=tina.roles[0])
    documents.work_order.set_status(theirs, "cancelled", by="sam", role=sam.roles[0])
    await asyncio.gather(tina.start(), sam.start())
    await asyncio.gather(tina.wait_acked(), sam.wait_acked())

    def settled(client: Client) -> bool:
        doc = client.doc("wo:d1")
        return doc.get("fields", type=Map).get("status") == "cancelled" and len(log_of(doc)) == 7

    await eventually(lambda: settled(tina))
    await eventually(lambda: settled(sam))
    stored = await stored_doc(server, "wo:d1")
    for doc in (mine, theirs):
        assert documents.to_json("wo:d1", doc) == documents.to_json("wo:d1", stored)
    assert stored.get("checklist", type=Array)[0]["done"] is True  # the work is kept
    # Created assigned and moved on to in_progress by sam, then tina's three moves, sam's cancel.
    assert sorted(e["by"] for e in log_of(stored)) == ["sam"] * 4 + ["tina"] * 3
    await tina.close()
    await sam.close()
