"""The REST screens and what devices need over REST (issue 5), against a real server: content and
order of each screen, scope per role, pagination, compression, ETags and problem documents."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from fieldsync import documents
from fieldsync.api._http import MIN_COMPRESSED
from fieldsync.api._paging import MAX_PAGE
from fieldsync.app import BACKEND
from fieldsync.auth import DevIssuer
from fieldsync.storage import SQLiteBackend
from tests.harness import Reply, Server, assert_problem, decoded, running_server, work_order
from tests.wire import connect

# --- talking to the server ----------------------------------------------------------------------


async def call(
    server: Server,
    path: str,
    subject: str | None = None,
    *,
    method: str = "GET",
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    sent = {"Accept-Encoding": "identity", **(headers or {})}
    if subject is not None:
        sent["Authorization"] = f"Bearer {server.token(subject)}"
    # No automatic decompression: the tests see the bytes the server sent.
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.request(method, server.url + path, json=body, headers=sent) as response,
    ):
        return Reply(response.status, response.headers, await response.read())


async def create(server: Server, subject: str, *docs: tuple[str, Doc[Any]]) -> None:
    """Create documents as a device of `subject` would, pipelined, and wait for every ack."""
    async with connect(server.sync_url, server.token(subject)) as wire:
        await wire.hello()
        for doc_id, doc in docs:
            await wire.update(doc_id, doc.get_update())
        for doc_id, _ in docs:
            await wire.control("ack", doc=doc_id)
        assert not [c for c in wire.controls if c.get("type") == "error"]


def wo(doc_id: str, **fields: Any) -> tuple[str, Doc[Any]]:
    return doc_id, work_order(doc_id, **fields)


def ids(reply: Reply) -> list[str]:
    return [item["id"] for item in reply.json["items"]]


async def add_asset(server: Server, key: str, data: Mapping[str, Any]) -> None:
    """The asset registry's row `key`, as an adapter's import would store it."""
    row = {"id": key, **data}
    await server.app[BACKEND].reference.import_rows("assets", [row], full=False)


# --- my work --------------------------------------------------------------------------------


async def test_my_work_lists_the_callers_work_orders_by_due_time(server: Server) -> None:
    await create(
        server,
        "sam",
        wo("wo:later", due_at="2026-12-03", site="Harbor", asset_id="P-104"),
        wo("wo:none"),  # no due time: last
        # 07:30 at +02:00 is 05:30 UTC: before 2026-12-01T06:00Z however the text sorts.
        wo("wo:offset", due_at="2026-12-01T07:30:00+02:00", priority="urgent"),
        wo("wo:utc", due_at="2026-12-01T06:00:00Z"),
        wo("wo:toms", assignee="tom", due_at="2026-11-01"),
    )
    await add_asset(server, "P-104", {"name": "Pump P-104", "make": "Grundfos"})
    reply = await call(server, "/v1/screens/my-work", "tina")
    assert reply.status == 200
    assert ids(reply) == ["wo:offset", "wo:utc", "wo:later", "wo:none"]
    assert reply.json["next"] is None
    later = reply.json["items"][2]
    assert later == {
        "id": "wo:later",
        "number": "later",
        "title": "Inspect pump wo:later",
        "status": "assigned",
        "priority": None,
        "due_at": "2026-12-03",
        "site": "Harbor",
        "asset_id": "P-104",
        "asset_name": "Pump P-104",
    }
    assert reply.json["items"][0]["due_at"] == "2026-12-01T05:30:00Z"
    assert ids(await call(server, "/v1/screens/my-work", "tom")) == ["wo:toms"]
    # A supervisor's own work is what is assigned to it: nothing here.
    assert ids(await call(server, "/v1/screens/my-work", "sam")) == []


async def test_an_asset_without_reference_data_shows_no_name(server: Server) -> None:
    await create(server, "sam", wo("wo:a1", asset_id="P-999"))
    await add_asset(server, "P-555", {"name": "not this one"})
    await add_asset(server, "P-999", {"no_name": True})
    (item,) = (await call(server, "/v1/screens/my-work", "tina")).json["items"]
    assert (item["asset_id"], item["asset_name"]) == ("P-999", None)


async def test_my_work_follows_a_reassignment(server: Server) -> None:
    await create(server, "sam", wo("wo:r1"))
    assert ids(await call(server, "/v1/screens/my-work", "tina")) == ["wo:r1"]
    sam = server.client("sam")
    await sam.start()
    try:
        await sam.wait_synced("wo:r1")
        sam.doc("wo:r1").get("fields", type=Map)["assignee"] = "tom"
        await sam.wait_acked("wo:r1")
    finally:
        await sam.close()
    assert ids(await call(server, "/v1/screens/my-work", "tina")) == []
    assert ids(await call(server, "/v1/screens/my-work", "tom")) == ["wo:r1"]


# --- one work order ------------------------------------------------------------------------------


async def test_the_work_order_screen_shows_document_forms_attachments_and_asset(
    server: Server,
) -> None:
    _, doc = wo("wo:d1", asset_id="AHU-7", site="Depot")
    doc.get("attachments", type=Map)["ab" * 32] = Map(
        {"mime": "image/jpeg", "size": 1234, "caption": "seal", "by": "sam", "at": 1.0}
    )
    form: Doc[Any] = Doc()
    documents.form.write(form, "wo:d1", "safety-check", 3, {"permit": "PTW-1"})
    await create(server, "sam", ("wo:d1", doc), ("form:d1-safety", form))
    await add_asset(server, "AHU-7", {"name": "Air handler 7", "floor": 2})

    reply = await call(server, "/v1/screens/work-order/wo:d1", "tina")
    assert reply.status == 200
    body = reply.json
    assert body["id"] == "wo:d1"
    assert body["seq"] >= 1
    assert body["fields"]["asset_id"] == "AHU-7"
    assert body["fields"]["site"] == "Depot"
    assert body["checklist"] == [
        {"id": "c1", "label": "Check seals", "required": True, "done": False}
    ]
    (shown,) = body["forms"]
    validation = shown.pop("validation")
    assert shown == {
        "id": "form:d1-safety",
        "template": "safety-check",
        "version": 3,
        "answers": {"permit": "PTW-1"},
    }
    # The server's marks on the answers, as the form document holds them (null: none).
    assert validation is None or all(isinstance(v, str) for v in validation.values())
    (attachment,) = body["attachments"]
    assert attachment["sha256"] == "ab" * 32
    assert attachment["mime"] == "image/jpeg"
    assert attachment["caption"] == "seal"
    assert body["asset"] == {"id": "AHU-7", "name": "Air handler 7", "floor": 2}


async def test_absent_and_out_of_scope_work_orders_look_alike(server: Server) -> None:
    await create(server, "sam", wo("wo:tinas"))
    await create(server, "sue", wo("wo:south", assignee="ulla", team="south", region="west"))
    for path in ("/v1/screens/work-order/", "/v1/work-orders/"):
        assert (await call(server, path + "wo:tinas", "tina")).status == 200
        assert (await call(server, path + "wo:tinas", "sam")).status == 200
        refused = [
            (await call(server, path + "wo:tinas", "tom"), "wo:tinas"),  # a teammate's
            (await call(server, path + "wo:south", "sam"), "wo:south"),  # another team's
            (await call(server, path + "wo:nothing", "sam"), "wo:nothing"),  # absent
            (await call(server, path + "form:tinas-x", "tina"), "form:tinas-x"),  # not a wo
            (await call(server, path + "wo:%20bad", "tina"), "wo: bad"),  # not an id
        ]
        bodies = []
        for reply, doc_id in refused:
            body = assert_problem(reply, 403, "forbidden")
            bodies.append(json.dumps(body).replace(doc_id, "<id>"))
        assert len(set(bodies)) == 1, bodies


# --- role screens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/v1/screens/team-queue", ["tina", "mia", "ada", "nobody"]),
        ("/v1/screens/region-metrics", ["tina", "sam", "ada", "nobody"]),
    ],
)
async def test_role_screens_refuse_other_roles(
    server: Server, path: str, refused: list[str]
) -> None:
    for subject in refused:
        assert_problem(await call(server, path, subject), 403, "forbidden")
    assert_problem(await call(server, path), 401, "reauthenticate")


async def test_the_team_queue_filters_and_counts_the_teams_work(server: Server) -> None:
    await create(
        server,
        "sam",
        wo("wo:q1", due_at="2026-12-05"),
        wo("wo:q2", assignee="tom", status="in_progress", due_at="2026-12-01"),
        wo("wo:q3", assignee="tom", due_at="2026-12-02"),
        wo("wo:q4", assignee=None, status="new"),
    )
    await create(server, "sue", wo("wo:q5", assignee="ulla", team="south", region="west"))
    everything = await call(server, "/v1/screens/team-queue", "sam")
    assert ids(everything) == ["wo:q2", "wo:q3", "wo:q1", "wo:q4"]
    assert everything.json["counts"] == {"assigned": 2, "in_progress": 1, "new": 1}
    assert everything.json["items"][0]["assignee"] == "tom"

    toms = await call(server, "/v1/screens/team-queue?assignee=tom", "sam")
    assert ids(toms) == ["wo:q2", "wo:q3"]
    assert toms.json["counts"] == {"assigned": 1, "in_progress": 1}
    # The status filter narrows the list; the counts still label every status tab.
    assigned = await call(server, "/v1/screens/team-queue?status=assigned&assignee=tom", "sam")
    assert ids(assigned) == ["wo:q3"]
    assert assigned.json["counts"] == {"assigned": 1, "in_progress": 1}
    assert ids(await call(server, "/v1/screens/team-queue", "sue")) == ["wo:q5"]
    assert_problem(
        await call(server, "/v1/screens/team-queue?status=", "sam"), 400, "invalid_request"
    )


async def test_region_metrics_aggregate_per_team_of_the_region(server: Server) -> None:
    await create(
        server,
        "ada",
        wo("wo:n1", status="completed", due_at="2020-01-01"),
        wo("wo:n2", due_at="2020-01-01"),  # overdue
        wo("wo:n3", status="cancelled", due_at="2020-01-01"),  # ended: not overdue
        wo("wo:n4", due_at="2999-01-01"),
        wo("wo:e1", assignee="x", team="east-2", region="east", status="on_hold"),
        wo("wo:w1", assignee="ulla", team="south", region="west"),  # another region
    )
    reply = await call(server, "/v1/screens/region-metrics", "mia")
    assert reply.status == 200
    assert reply.json["next"] is None
    east2, north = reply.json["items"]
    assert north["team"] == "north"
    assert north["total"] == 4
    assert north["by_status"] == {"assigned": 2, "cancelled": 1, "completed": 1}
    assert north["overdue"] == 1
    assert north["completed"] == 1
    assert north["first_time_fix_rate"] == 1.0
    assert north["mean_seconds_to_complete"] == 0.0  # created completed
    assert isinstance(north["conflicts_24h"], int)
    assert east2["team"] == "east-2"
    assert east2["by_status"] == {"on_hold": 1}
    assert east2["completed"] == 0
    assert east2["first_time_fix_rate"] is None
    assert east2["mean_seconds_to_complete"] is None


# --- pagination ---------------------------------------------------------------------------------


async def test_a_cursor_is_stable_while_work_orders_are_inserted(server: Server) -> None:
    days = [3, 5, 7, 9, 11, 13, 15]
    await create(server, "sam", *(wo(f"wo:p{d}", due_at=f"2026-12-{d:02d}") for d in days))
    first = await call(server, "/v1/screens/my-work?limit=3", "tina")
    assert ids(first) == ["wo:p3", "wo:p5", "wo:p7"]
    cursor = first.json["next"]
    # Inserted before the cursor (not seen: the reader is past them), at it, and after it.
    await create(
        server,
        "sam",
        wo("wo:p1", due_at="2026-12-01"),
        wo("wo:p7b", due_at="2026-12-07"),  # same due as the page's last: ids break the tie
        wo("wo:p07", due_at="2026-12-07"),  # "wo:p07" < "wo:p7": before the cursor, not seen
        wo("wo:p10", due_at="2026-12-10"),
    )
    seen = ids(first)
    while cursor is not None:
        page = await call(server, f"/v1/screens/my-work?limit=3&cursor={cursor}", "tina")
        assert page.status == 200
        seen += ids(page)
        cursor = page.json["next"]
    assert seen == [
        "wo:p3",
        "wo:p5",
        "wo:p7",
        "wo:p7b",
        "wo:p9",
        "wo:p10",
        "wo:p11",
        "wo:p13",
        "wo:p15",
    ]


async def test_a_page_is_never_larger_than_the_maximum(server: Server) -> None:
    count = MAX_PAGE + 3
    await create(server, "sam", *(wo(f"wo:m{n:03d}", due_at="2026-12-01") for n in range(count)))
    default = await call(server, "/v1/screens/my-work", "tina")
    assert len(ids(default)) == 50
    assert default.json["next"]
    everything = await call(server, "/v1/screens/my-work?limit=100000", "tina")
    assert len(ids(everything)) == MAX_PAGE
    rest = await call(
        server, f"/v1/screens/my-work?limit=100000&cursor={everything.json['next']}", "tina"
    )
    assert len(ids(rest)) == 3
    assert rest.json["next"] is None
    assert set(ids(everything) + ids(rest)) == {f"wo:m{n:03d}" for n in range(count)}


async def test_a_cursor_not_made_for_this_list_is_refused(server: Server) -> None:
    await create(server, "sam", *(wo(f"wo:c{n}", assignee="tom") for n in range(3)))
    cursor = (await call(server, "/v1/screens/my-work?limit=1", "tom")).json["next"]
    queue = (await call(server, "/v1/screens/team-queue?limit=1", "sam")).json["next"]
    assert (await call(server, f"/v1/screens/my-work?limit=1&cursor={cursor}", "tom")).status == 200
    flipped = cursor[:5] + ("A" if cursor[5] != "A" else "B") + cursor[6:]
    for path, subject in [
        (f"/v1/screens/my-work?cursor={flipped}", "tom"),  # edited
        (f"/v1/screens/my-work?cursor={cursor[:-3]}", "tom"),  # truncated
        ("/v1/screens/my-work?cursor=not-a-cursor!", "tom"),
        ("/v1/screens/my-work?cursor=", "tom"),
        (f"/v1/screens/my-work?cursor={cursor}", "tina"),  # another caller's
        (f"/v1/screens/my-work?cursor={queue}", "tom"),  # another list's
        (f"/v1/screens/team-queue?cursor={queue}&assignee=tom", "sam"),  # another filter's
    ]:
        assert_problem(await call(server, path, subject), 400, "invalid_cursor")
    for bad in ("0", "-1", "ten", "1.5", "٣"):
        reply = await call(server, f"/v1/screens/my-work?limit={bad}", "tom")
        assert_problem(reply, 400, "invalid_request")


# --- compression and revalidation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip", "gzip"),
        ("x-gzip", "gzip"),
        ("gzip, deflate, br, zstd", "br"),  # the server's preference among equals
        ("gzip;q=1, br;q=0.5", "gzip"),  # the client's weights first
        ("*", "br"),
        ("br;q=0, *;q=0.1", "zstd"),
        ("identity", None),
        ("deflate", None),  # nothing the server speaks: as it is
        ("br;q=0.2, identity", None),
    ],
)
async def test_responses_are_compressed_by_accept_encoding(
    server: Server, accept: str, coding: str | None
) -> None:
    await create(server, "sam", *(wo(f"wo:z{n}", due_at="2026-12-01") for n in range(12)))
    plain = await call(server, "/v1/screens/my-work", "tina")
    assert len(plain.body) > MIN_COMPRESSED
    assert "Content-Encoding" not in plain.headers
    reply = await call(server, "/v1/screens/my-work", "tina", headers={"Accept-Encoding": accept})
    assert reply.status == 200
    assert reply.headers.get("Content-Encoding") == coding
    assert reply.headers["Vary"] == "Accept-Encoding"
    assert decoded(reply) == plain.body
    if coding is not None:
        assert len(reply.body) < len(plain.body) / 4
    # One validator for the content, whatever coding carried it.
    assert reply.headers["ETag"] == plain.headers["ETag"]


async def test_small_bodies_travel_uncompressed(server: Server) -> None:
    reply = await call(server, "/v1/screens/my-work", "tina", headers={"Accept-Encoding": "br"})
    assert reply.status == 200
    assert reply.json == {"items": [], "next": None}
    assert "Content-Encoding" not in reply.headers


async def test_an_unchanged_screen_revalidates_with_304_and_no_body(server: Server) -> None:
    await create(server, "sam", wo("wo:e1"), wo("wo:e2"))
    first = await call(server, "/v1/screens/my-work", "tina", headers={"Accept-Encoding": "br"})
    etag = first.headers["ETag"]
    assert etag.startswith('W/"')
    assert first.headers["Cache-Control"] == "private, no-cache"
    for validator in (etag, etag.removeprefix("W/"), f'"other", {etag}', "*"):
        again = await call(
            server,
            "/v1/screens/my-work",
            "tina",
            headers={"If-None-Match": validator, "Accept-Encoding": "br"},
        )
        assert again.status == 304
        assert again.body == b""
        assert again.headers["ETag"] == etag
        assert "Content-Encoding" not in again.headers
    await create(server, "sam", wo("wo:e3"))
    changed = await call(server, "/v1/screens/my-work", "tina", headers={"If-None-Match": etag})
    assert changed.status == 200
    assert changed.headers["ETag"] != etag
    assert ids(changed) == ["wo:e1", "wo:e2", "wo:e3"]
    # Another caller's view of other content never matches.
    toms = await call(server, "/v1/screens/my-work", "tom", headers={"If-None-Match": etag})
    assert toms.status == 200


# --- the change feed and work orders over REST -------------------------------------------------


@pytest.fixture
async def small_pages(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data", issuer, changes_page=2) as server:
        yield server


async def test_the_change_feed_pages_what_the_caller_may_see(small_pages: Server) -> None:
    server = small_pages
    await create(server, "sam", wo("wo:f1"), wo("wo:f2", assignee="tom"), wo("wo:f3"))
    first = (await call(server, "/v1/changes?limit=1000", "tina")).json
    assert [d["id"] for d in first["docs"]] == ["wo:f1", "wo:f3"]  # at most changes_page
    assert first["more"] is False
    assert first["since"] == 0
    assert first["removed"] == []
    sams = (await call(server, "/v1/changes", "sam")).json
    assert [d["id"] for d in sams["docs"]] == ["wo:f1", "wo:f2"]
    assert sams["more"] is True
    rest = (await call(server, f"/v1/changes?since={sams['upto']}", "sam")).json
    assert [d["id"] for d in rest["docs"]] == ["wo:f3"]
    assert rest["more"] is False
    one = (await call(server, "/v1/changes?limit=1", "sam")).json
    assert len(one["docs"]) == 1
    assert one["more"] is True
    nothing = (await call(server, f"/v1/changes?since={rest['upto']}", "sam")).json
    assert nothing["docs"] == []
    assert nothing["upto"] == rest["upto"]
    for bad in ("since=-1", "since=x", "limit=0"):
        assert_problem(await call(server, f"/v1/changes?{bad}", "sam"), 400, "invalid_request")


NEW: dict[str, Any] = {
    "fields": {
        "number": "WO-9001",
        "title": "Replace seal on pump P-104",
        "assignee": "tina",
        "priority": "high",
        "due_at": "2026-12-24T10:00:00+01:00",
        "site": "Harbor Pumping Station",
        "asset_id": "P-104",
    },
    "checklist": [
        {"label": "Isolate the pump", "required": True},
        {"id": "leak", "label": "Leak test"},
    ],
    "notes": "Drips at the seal.",
}


async def test_a_supervisor_creates_a_work_order_through_the_write_path(server: Server) -> None:
    async with connect(server.sync_url, server.token("tina")) as device:
        await device.hello()
        created = await call(server, "/v1/work-orders", "sam", method="POST", body=NEW)
        assert created.status == 201, created.body
        body = created.json
        doc_id = body["id"]
        assert created.headers["Location"] == f"/v1/work-orders/{doc_id}"
        assert body["fields"] == {
            **NEW["fields"],
            "team": "north",
            "region": "east",
            "status": "assigned",
        }
        assert body["checklist"] == [
            {"id": "c1", "label": "Isolate the pump", "required": True, "done": False},
            {"id": "leak", "label": "Leak test", "required": False, "done": False},
        ]
        assert body["notes"] == "Drips at the seal."
        assert body["seq"] >= 1
        # The assignee's live session hears of it as of any device-made work order.
        scope = await device.control("scope")
        assert scope["added"] == [doc_id]
    assert (await call(server, f"/v1/work-orders/{doc_id}", "tina")).json == body
    (card,) = (await call(server, "/v1/screens/my-work", "tina")).json["items"]
    assert card["due_at"] == "2026-12-24T09:00:00Z"
    assert card["priority"] == "high"
    backend = server.app[BACKEND]
    assert isinstance(backend, SQLiteBackend)  # the log's columns are SQLite's
    rows = await backend.store.query(
        lambda db: db.execute(
            "SELECT origin, actor FROM updates WHERE doc = ?", (doc_id,)
        ).fetchall()
    )
    assert rows == [("rest", "sam")]


async def test_a_client_named_id_makes_a_retry_harmless(server: Server) -> None:
    named = {**NEW, "id": "wo:WO-9001"}
    first = await call(server, "/v1/work-orders", "sam", method="POST", body=named)
    assert first.status == 201
    retry = await call(server, "/v1/work-orders", "sam", method="POST", body=named)
    body = assert_problem(retry, 409, "already_exists")
    assert body["location"] == "/v1/work-orders/wo:WO-9001"
    # Somebody who may not see it learns nothing more than for any forbidden id.
    elsewhere = {**named, "fields": {**NEW["fields"], "assignee": "ulla"}}
    assert_problem(
        await call(server, "/v1/work-orders", "sue", method="POST", body=elsewhere),
        403,
        "forbidden",
    )


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("tina", NEW),  # technicians do not create work orders
        ("nobody", NEW),  # no role: no creation rights
        ("sam", {**NEW, "fields": {**NEW["fields"], "team": "south"}}),  # another team
    ],
)
async def test_creation_follows_the_policy(server: Server, subject: str, body: Any) -> None:
    reply = await call(server, "/v1/work-orders", subject, method="POST", body=body)
    assert_problem(reply, 403, "forbidden")


async def test_an_invalid_work_order_is_refused_with_every_problem(server: Server) -> None:
    bad = {
        "id": "form:1",
        "fields": {"title": " ", "status": "completed", "priority": "asap", "colour": "red"},
        "checklist": [{"label": ""}, "x", {"label": "ok", "required": "yes", "extra": 1}],
        "notes": 7,
        "other": True,
    }
    reply = await call(server, "/v1/work-orders", "sam", method="POST", body=bad)
    body = assert_problem(reply, 400, "invalid_request")
    assert sorted(e["path"] for e in body["errors"]) == [
        "checklist.0.label",
        "checklist.1",
        "checklist.2.extra",
        "checklist.2.required",
        "fields.colour",
        "fields.priority",
        "fields.status",
        "fields.title",
        "id",
        "notes",
        "other",
    ]
    for raw, content_type, status, code in (
        (b"{", "application/json", 400, "invalid_request"),
        (b"[]", "application/json", 400, "invalid_request"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
    ):
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                server.url + "/v1/work-orders",
                data=raw,
                headers={
                    "Authorization": f"Bearer {server.token('sam')}",
                    "Content-Type": content_type,
                },
            ) as response,
        ):
            assert response.status == status
            assert (await response.json(content_type=None))["code"] == code
    assert (await call(server, "/v1/changes", "ada")).json["docs"] == []
