"""Audit screens over REST: who changed which field of a work order, and the conflicts the
domain rules resolved, for the people who answer for the work."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from pycrdt import Doc

from tests.harness import Server
from tests.wire import Wire, sam_and_tina


async def get(server: Server, path: str, subject: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    async with aiohttp.ClientSession() as http, http.get(server.url + path, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def edit(wire: Wire, doc_id: str, doc: Doc[Any], **fields: object) -> dict[str, Any]:
    await wire.edit(doc_id, doc, **fields)
    return await wire.control("ack", doc=doc_id)


@pytest.fixture
async def history(server: Server) -> Server:
    """wo:a1 (tina's, team north): its due date moved three times by sam, its status once by
    tina, and one status change tina may not make (a conflict)."""
    async with sam_and_tina(server, "wo:a1", status="assigned") as (sam, tina):
        boss = await sam.replica("wo:a1")
        for day in ("2026-12-01", "2026-12-08", "2026-12-15"):
            await edit(sam, "wo:a1", boss, due_at=day)
        mine = await tina.replica("wo:a1")
        await tina.move("wo:a1", mine, "en_route", "tina", "technician")
        await tina.control("ack", doc="wo:a1")
        # Not a technician's to make.
        await tina.move("wo:a1", mine, "closed", "tina", "technician")
        await tina.control("ack", doc="wo:a1")
        await tina.control("error", doc="wo:a1")
    return server


async def test_who_changed_the_due_date_and_when(history: Server) -> None:
    status, body = await get(history, "/v1/work-orders/wo:a1/history?path=fields.due_at", "sam")
    assert status == 200
    assert [(i["actor"], i["old"], i["new"]) for i in body["items"]] == [
        ("sam", "2026-12-08", "2026-12-15"),
        ("sam", "2026-12-01", "2026-12-08"),
        ("sam", None, "2026-12-01"),
    ]
    seqs = [i["seq"] for i in body["items"]]
    assert seqs == sorted(seqs, reverse=True)
    assert {i["origin"] for i in body["items"]} == {"device:wire"}  # `hello`'s device id
    # The correction of tina's closing is the rules' own change.
    _, changes = await get(history, "/v1/work-orders/wo:a1/history?path=fields.status", "sam")
    assert [(i["new"], i["origin"]) for i in changes["items"]][:2] == [
        ("en_route", "rules"),
        ("closed", "device:wire"),
    ]


async def test_history_pages_cover_every_change_once(history: Server) -> None:
    seen: list[tuple[int, str]] = []
    path = "/v1/work-orders/wo:a1/history?limit=3"
    while path:
        status, body = await get(history, path, "mia")
        assert status == 200
        seen += [(i["seq"], i["path"]) for i in body["items"]]
        path = (
            f"/v1/work-orders/wo:a1/history?limit=3&cursor={body['next']}" if body["next"] else ""
        )
    _, everything = await get(history, "/v1/work-orders/wo:a1/history?limit=200", "mia")
    assert seen == [(i["seq"], i["path"]) for i in everything["items"]]
    assert "fields.title" in {p for _, p in seen}
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize(("subject", "status"), [("tina", 403), ("ulla", 403), ("sue", 403)])
async def test_history_is_for_auditors_of_the_scope(
    history: Server, subject: str, status: int
) -> None:
    got, body = await get(history, "/v1/work-orders/wo:a1/history", subject)
    assert (got, body["code"]) == (status, "forbidden")
    # …and an absent work order looks the same as one outside the scope.
    assert (await get(history, "/v1/work-orders/wo:none/history", "sue"))[1] == (
        await get(history, "/v1/work-orders/wo:a1/history", "sue")
    )[1] | {"detail": "wo:none: not in your scope"}


async def test_conflicts_are_listed_for_the_team(history: Server) -> None:
    status, body = await get(history, "/v1/conflicts", "sam")
    assert status == 200
    assert [(i["doc"], i["rule"], i["actor"], i["origin"]) for i in body["items"]] == [
        ("wo:a1", "status_transition", "tina", "device:wire")
    ]
    assert (await get(history, "/v1/conflicts", "sue"))[1]["items"] == []  # another team
    assert (await get(history, "/v1/conflicts", "tina"))[0] == 403
