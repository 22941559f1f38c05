"""What a write may not do whatever its path (v1, y-websocket, REST): leave a work order outside
its writer's scope, rewrite the checklist or another's time as a technician, create a form no
template can judge, or bring a work order into existence past its creation status. Each is
refused whole: nothing stored or broadcast, the device told `forbidden_field` and reset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from pycrdt import Array, Doc, Map

from fieldsync import documents
from fieldsync.app import STORE
from fieldsync.errors import CloseCode
from fieldsync.replication import SyncStep, YSync, decode_y, encode_sync
from tests.harness import Server, stored_doc, work_order
from tests.wire import Wire, connect, sam_and_tina


async def refused(wire: Wire, doc_id: str, update: bytes) -> dict[str, Any]:
    """Send `update`; the error it gets, after checking the reset that goes with it."""
    await wire.update(doc_id, update)
    error = await wire.control("error", doc=doc_id)
    assert error["code"] == "forbidden_field", error
    assert (await wire.control("reset", doc=doc_id))["reason"] == "forbidden_field"
    return error


async def edit(wire: Wire, doc_id: str, change: Callable[[Doc[Any]], object]) -> bytes:
    """What `change` writes on a fresh replica of `doc_id`."""
    replica = await wire.replica(doc_id)
    before = replica.get_state()
    change(replica)
    return replica.get_update(before)


def setting(**fields: object) -> Callable[[Doc[Any]], object]:
    return lambda doc: doc.get("fields", type=Map).update(fields)


def status_is(value: str) -> Callable[[Doc[Any]], bool]:
    return lambda doc: doc.get("fields", type=Map)["status"] == value


async def stored_rows(server: Server) -> int:
    return int((await server.app[STORE].stats())["updates"])


# --- 1. a write never leaves a work order outside its writer's scope --------------------------


async def test_a_supervisor_cannot_move_a_work_order_out_of_its_team_or_region(
    server: Server,
) -> None:
    async with (
        sam_and_tina(server, "wo:s1") as (sam, _tina),
        connect(server.sync_url, server.token("sue")) as sue,
    ):
        await sue.hello()
        rows = await stored_rows(server)
        for key, value in (("team", "south"), ("region", "west"), ("team", None)):
            update = await edit(sam, "wo:s1", setting(**{key: value}))
            error = await refused(sam, "wo:s1", update)
            assert error["paths"] == [f"fields.{key}"]
            assert "outside your scope" in error["message"]
        assert await stored_rows(server) == rows
        # Within the scope, the same field moves: another assignee of the team.
        update = await edit(sam, "wo:s1", setting(assignee="tom"))
        await sam.update("wo:s1", update)
        await sam.control("ack", doc="wo:s1")
        # The team south never heard of it.
        assert not [c for c in sue.controls if c.get("type") == "scope"]
    index = await server.app[STORE].index("wo:s1")
    assert index is not None
    assert (index.team, index.region, index.assignee) == ("north", "east", "tom")


async def test_a_manager_moves_work_between_the_teams_of_its_region_only(server: Server) -> None:
    async with connect(server.sync_url, server.token("mia")) as mia:
        await mia.hello()
        await mia.update("wo:s2", work_order("wo:s2", by="mia", role="manager").get_update())
        await mia.control("ack", doc="wo:s2")
        update = await edit(mia, "wo:s2", setting(team="east-2"))
        await mia.update("wo:s2", update)
        await mia.control("ack", doc="wo:s2")
        update = await edit(mia, "wo:s2", setting(region="west"))
        assert (await refused(mia, "wo:s2", update))["paths"] == ["fields.region"]
    index = await server.app[STORE].index("wo:s2")
    assert index is not None
    assert (index.team, index.region) == ("east-2", "east")


async def test_a_y_websocket_write_that_leaves_the_scope_closes_the_socket(
    server: Server,
) -> None:
    async with sam_and_tina(server, "wo:s3") as (sam, _tina):
        update = await edit(sam, "wo:s3", setting(team="south"))
        rows = await stored_rows(server)
    headers = {"Authorization": f"Bearer {server.token('sam')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.yws_url("wo:s3"), headers=headers) as ws,
    ):
        greeting = decode_y((await ws.receive(timeout=10)).data)
        assert isinstance(greeting, YSync)
        assert greeting.step is SyncStep.STEP1
        await ws.send_bytes(encode_sync(SyncStep.UPDATE, update))
        closing = await ws.receive(timeout=10)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert (ws.close_code, closing.extra) == (CloseCode.FORBIDDEN, "forbidden_field")
    assert await stored_rows(server) == rows
    doc = await stored_doc(server, "wo:s3")
    assert doc.get("fields", type=Map)["team"] == "north"


async def test_rest_creates_a_work_order_in_the_creators_team_and_region_only(
    server: Server,
) -> None:
    headers = {"Authorization": f"Bearer {server.token('sam')}"}
    async with aiohttp.ClientSession() as http:
        for n, fields in enumerate(({"region": "west"}, {"team": "south"})):
            body = {"id": f"wo:s4-{n}", "fields": {"title": "Inspect pump", **fields}}
            async with http.post(server.url + "/v1/work-orders", json=body, headers=headers) as r:
                assert (r.status, (await r.json())["code"]) == (403, "forbidden")
            assert await server.app[STORE].index(f"wo:s4-{n}") is None
        body = {"id": "wo:s4-ok", "fields": {"title": "Inspect pump"}}
        async with http.post(server.url + "/v1/work-orders", json=body, headers=headers) as r:
            assert r.status == 201
            assert (await r.json())["fields"]["region"] == "east"


# --- 2. a technician ticks the checklist and logs its own time --------------------------------


async def test_a_technician_ticks_items_but_cannot_change_what_completion_requires(
    server: Server,
) -> None:
    async with sam_and_tina(server, "wo:c1", status="in_progress") as (_sam, tina):
        rows = await stored_rows(server)

        def item(d: Doc[Any]) -> Map[Any]:
            first: Map[Any] = d.get("checklist", type=Array)[0]
            return first

        attempts: list[tuple[Callable[[Doc[Any]], object], list[str]]] = [
            (lambda d: item(d).__setitem__("required", False), ["checklist.0.required"]),
            (lambda d: item(d).__setitem__("label", "Nothing"), ["checklist.0.label"]),
            (lambda d: d.get("checklist", type=Array).__delitem__(0), ["checklist"]),
            (lambda d: d.get("checklist", type=Array).append(Map({"label": "x"})), ["checklist"]),
            (
                lambda d: d.get("time_entries", type=Array).append(
                    Map({"by": "tom", "start": 1, "end": 2})
                ),
                ["time_entries"],
            ),
        ]
        for attempt, paths in attempts:
            error = await refused(tina, "wo:c1", await edit(tina, "wo:c1", attempt))
            assert error["paths"] == paths
        assert await stored_rows(server) == rows
        # The completion is still refused: the required item is not done.
        mine = await tina.replica("wo:c1")
        await tina.move("wo:c1", mine, "completed", "tina", "technician")
        await tina.control("ack", doc="wo:c1")
        assert (await tina.control("error", doc="wo:c1"))["rule"] == "completion_requirements"

        # Ticking it, in her name, and her own time: allowed, and the completion stands.
        def tick(d: Doc[Any]) -> None:
            item(d).update({"done": True, "done_by": "tina", "done_at": "2026-12-06T10:00Z"})
            d.get("time_entries", type=Array).append(Map({"by": "tina", "start": 1, "end": 2}))

        update = await edit(tina, "wo:c1", tick)
        await tina.update("wo:c1", update)
        await tina.control("ack", doc="wo:c1")
        await tina.follow("wo:c1", mine, status_is("completed"))


# --- 3. forms: a loaded template at creation; supervisors withdraw one -----------------------


async def test_a_form_with_an_unknown_template_is_refused_at_creation(server: Server) -> None:
    async with sam_and_tina(server, "wo:t1", status="in_progress") as (_sam, tina):
        for template, version in (("nope", 1), ("safety-check", 99)):
            form: Doc[Any] = Doc()
            documents.form.write(form, "wo:t1", template, version, {})
            error = await refused(tina, "form:t1", form.get_update())
            assert error["paths"] == ["meta.template", "meta.version"]
            assert f"unknown template {template} v{version}" in error["message"]
        assert await server.app[STORE].index("form:t1") is None
        form = Doc()
        documents.form.write(form, "wo:t1", "safety-check", 1, {})
        await tina.update("form:t1", form.get_update())
        await tina.control("ack", doc="form:t1")


async def test_a_supervisor_withdraws_a_form_that_blocks_completion(server: Server) -> None:
    async with sam_and_tina(server, "wo:t2", status="in_progress") as (sam, tina):
        form: Doc[Any] = Doc()
        documents.form.write(form, "wo:t2", "safety-check", 1, {})  # required answers missing
        await tina.update("form:t2", form.get_update())
        await tina.control("ack", doc="form:t2")
        mine = await tina.replica("wo:t2")
        before = mine.get_state()
        mine.get("checklist", type=Array)[0]["done"] = True
        documents.work_order.set_status(mine, "completed", by="tina", role="technician")
        await tina.update("wo:t2", mine.get_update(before))
        await tina.control("ack", doc="wo:t2")
        error = await tina.control("error", doc="wo:t2")
        assert error["rule"] == "completion_requirements"
        assert "form:t2" in error["detail"]

        def withdraw(d: Doc[Any]) -> None:
            documents.form.withdraw(d, by="tina", reason="wrong template")

        # Not the technician's to withdraw…
        error = await refused(tina, "form:t2", await edit(tina, "form:t2", withdraw))
        assert error["paths"] == ["withdrawn.at", "withdrawn.by", "withdrawn.reason"]
        # …the supervisor's: the form no longer counts, and the completion in the log stands.
        update = await edit(
            sam, "form:t2", lambda d: documents.form.withdraw(d, by="sam", reason="duplicate")
        )
        await sam.update("form:t2", update)
        await sam.control("ack", doc="form:t2")
        await tina.follow("wo:t2", mine, status_is("completed"))


# --- 9. one creation rule: a work order is born new or assigned -------------------------------


def born(status: str, logged: bool) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    fields = {"title": "Born late", "team": "north", "region": "east", "assignee": "tina"}
    doc.get("fields", type=Map).update({**fields, "status": status})
    if logged:
        documents.work_order.set_status(doc, status, by="sam", role="supervisor")
    return doc


async def test_a_work_order_cannot_be_born_completed(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        for n, (logged, path) in enumerate(((True, "status_log"), (False, "fields.status"))):
            error = await refused(sam, f"wo:b{n}", born("completed", logged).get_update())
            assert error["paths"] == [path]
            assert "created new or assigned, not completed" in error["message"]
            assert await server.app[STORE].index(f"wo:b{n}") is None
        # Over y-websocket, the same rule.
        headers = {"Authorization": f"Bearer {server.token('sam')}"}
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(server.yws_url("wo:b2"), headers=headers) as ws,
        ):
            await ws.receive(timeout=10)  # the greeting
            await ws.send_bytes(encode_sync(SyncStep.UPDATE, born("closed", True).get_update()))
            closing = await ws.receive(timeout=10)
            assert (ws.close_code, closing.extra) == (CloseCode.FORBIDDEN, "forbidden_field")
        assert await server.app[STORE].index("wo:b2") is None
        # Created assigned and completed in the same update: the completion is judged.
        doc = born("assigned", True)
        for status in ("en_route", "in_progress", "completed"):
            documents.work_order.set_status(doc, status, by="sam", role="supervisor")
        doc.get("checklist", type=Array).append(Map({"label": "Seals", "required": True}))
        await sam.update("wo:b3", doc.get_update())
        await sam.control("ack", doc="wo:b3")
        assert (await sam.control("error", doc="wo:b3"))["rule"] == "completion_requirements"
        assert status_is("in_progress")(await sam.replica("wo:b3"))
