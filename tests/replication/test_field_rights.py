"""Field-level write rights on the write path: an update that writes a field the role may not
write is refused whole, never stored or broadcast, and the device is told to resync."""

from __future__ import annotations

from typing import Any

from pycrdt import Doc, Map, Text

from fieldsync import documents
from fieldsync.app import STORE
from fieldsync.replication import SyncStep
from tests.harness import Server, stored_doc, work_order
from tests.wire import connect, sam_and_tina


async def test_a_technician_edits_status_and_notes_but_not_the_assignee(server: Server) -> None:
    async with sam_and_tina(server, "wo:f", assignee="tina") as (sam, tina):
        theirs = await tina.replica("wo:f")
        await sam.replica("wo:f")
        store = server.app[STORE]

        before = theirs.get_state()
        documents.work_order.set_status(theirs, "en_route", by="tina", role="technician")
        theirs.get("notes", type=Text).insert(0, "on my way")
        await tina.update("wo:f", theirs.get_update(before))
        assert (await tina.control("ack", doc="wo:f"))["seq"] > 0
        assert await sam.doc_message("wo:f", SyncStep.UPDATE)
        stored = (await store.stats())["updates"]

        before = theirs.get_state()
        fields = theirs.get("fields", type=Map)
        fields["assignee"] = "tom"
        fields["priority"] = "urgent"
        documents.work_order.set_status(theirs, "in_progress", by="tina", role="technician")
        await tina.update("wo:f", theirs.get_update(before))
        error = await tina.control("error", doc="wo:f")
        assert error["code"] == "forbidden_field"
        assert error["paths"] == ["fields.assignee", "fields.priority"]
        assert (await tina.control("reset", doc="wo:f"))["reason"] == "forbidden_field"
        assert (await store.stats())["updates"] == stored  # nothing of it stored…

        # …nor broadcast, and a later allowed edit from a fresh replica still goes through.
        fresh = await tina.replica("wo:f")
        assert fresh.get("fields", type=Map)["assignee"] == "tina"
        assert fresh.get("fields", type=Map)["status"] == "en_route"
        before = fresh.get_state()
        documents.work_order.set_status(fresh, "in_progress", by="tina", role="technician")
        await tina.update("wo:f", fresh.get_update(before))
        await tina.control("ack", doc="wo:f")
        update = await sam.doc_message("wo:f", SyncStep.UPDATE)
        seen = await sam.replica("wo:f")
        seen.apply_update(update)
        assert seen.get("fields", type=Map)["assignee"] == "tina"
        assert seen.get("fields", type=Map)["status"] == "in_progress"


async def test_a_root_outside_the_schema_is_refused(server: Server) -> None:
    async with sam_and_tina(server, "wo:g", assignee="tina") as (_sam, tina):
        theirs = await tina.replica("wo:g")
        before = theirs.get_state()
        theirs.get("payload", type=Map)["x"] = 1
        await tina.update("wo:g", theirs.get_update(before))
        assert (await tina.control("error", doc="wo:g"))["paths"] == ["payload"]


async def test_a_form_keeps_its_work_order_and_template_version(server: Server) -> None:
    """`meta` is written when a form is created, never after, even by a role that writes
    everything: moving a form to another work order would move it into another scope unseen,
    and a form keeps the template version it was started with."""
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await sam.update("wo:m1", work_order("wo:m1").get_update())
        await sam.update("wo:m2", work_order("wo:m2", assignee="tom").get_update())
        form: Doc[Any] = Doc()
        documents.form.write(form, "wo:m1", "safety-check", 1, {"permit_number": "PTW-1"})
        await sam.update("form:m1", form.get_update())
        for _ in range(3):
            await sam.control("ack")
        for key, value in (("wo", "wo:m2"), ("version", 3)):
            replica = await sam.replica("form:m1")
            before = replica.get_state()
            replica.get("meta", type=Map)[key] = value
            await sam.update("form:m1", replica.get_update(before))
            error = await sam.control("error", doc="form:m1")
            assert (error["code"], error["paths"]) == ("forbidden_field", [f"meta.{key}"])
            await sam.control("reset", doc="form:m1")
        # Answers stay writable.
        replica = await sam.replica("form:m1")
        before = replica.get_state()
        replica.get("answers", type=Map)["gloves"] = True
        await sam.update("form:m1", replica.get_update(before))
        await sam.control("ack", doc="form:m1")
    stored = await stored_doc(server, "form:m1")
    assert stored.get("meta", type=Map).to_py() == {
        "wo": "wo:m1",
        "template": "safety-check",
        "version": 1,
    }
    assert stored.get("answers", type=Map)["gloves"] is True
