"""The `Screens` contract every backend keeps: the metrics' definitions, keyset pages, what a
list shows. (What SQLite's writer keeps for them, and its migration, are in test_sqlite.py.)"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import pycrdt
import pytest

from fieldsync.records import DocIndex, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import MetricsPage, Screens, Store, Write

EAST = ScopeFilter(ScopeKind.REGION, "east")
TINA_PHONE = Origin(OriginKind.DEVICE, "t")
_edits: dict[str, pycrdt.Doc[Any]] = {}


def edit(doc: str, **fields: str | None) -> Write:
    """An update of `doc`'s work order with the index its fields give (the store projects what
    it is handed; the document's content does not matter here)."""
    ydoc = _edits.setdefault(doc, pycrdt.Doc())
    before = ydoc.get_state()
    ydoc.get("body", type=pycrdt.Text).insert(0, "x")
    values = {"team": "north", "region": "east", "assignee": "tina", **fields}
    return Write(
        doc, ydoc.get_update(before), TINA_PHONE, "tina", DocIndex(doc, "wo", doc, **values)
    )


@pytest.fixture(autouse=True)
def fresh_edits() -> None:
    _edits.clear()


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def test_region_metrics_follow_their_definitions(store: Store, screens: Screens) -> None:
    began = time.time()
    for status in ("assigned", "completed", "in_progress", "completed"):  # reopened once
        await store.append(edit("wo:1", status=status))
    await store.append(edit("wo:2", status="completed"))
    await store.append(edit("wo:3", status="closed"))
    await store.append(edit("wo:4", status="assigned", due_at="2026-12-01"))
    await store.append(edit("wo:5", status="on_hold", due_at="2026-12-01T10:00:00Z"))
    await store.append(edit("wo:6", status="cancelled", due_at="2020-01-01"))
    await store.append(edit("wo:7", team="south", status="assigned", due_at="2020-01-01"))
    await store.append(edit("wo:8", region="west", team="west"))
    ended = time.time()

    def north(now: str) -> Awaitable[MetricsPage]:
        return screens.region_metrics(EAST, now=at(now), after=None, limit=10)

    page = await north("2026-12-01T09:59:59")
    assert [t.team for t in page.teams] == ["north", "south"]
    assert page.next is None
    team = page.teams[0]
    assert team.total == 6
    assert team.by_status == {
        "assigned": 1,
        "cancelled": 1,
        "closed": 1,
        "completed": 2,
        "on_hold": 1,
    }
    assert team.completed == 3  # completed or closed
    assert team.first_time_fix_rate == pytest.approx(2 / 3)
    assert team.overdue == 0  # a date is due at its end; 10:00 has not passed
    # From creation to completion, by the server's clock at commit: within the test's run.
    assert team.mean_seconds_to_complete is not None
    assert 0 <= team.mean_seconds_to_complete <= ended - began
    assert team.conflicts_24h == 0
    assert (await north("2026-12-01T10:00:01")).teams[0].overdue == 1
    assert (await north("2026-12-02T00:00:00")).teams[0].overdue == 2
    # Pages of teams, by name.
    first = await screens.region_metrics(EAST, now=at("2026-12-01T00:00:00"), after=None, limit=1)
    assert [t.team for t in first.teams] == ["north"]
    assert first.next == "north"
    second = await screens.region_metrics(
        EAST, now=at("2026-12-01T00:00:00"), after=first.next, limit=1
    )
    assert [t.team for t in second.teams] == ["south"]
    assert second.next is None
    nothing = await screens.region_metrics(
        ScopeFilter(ScopeKind.NONE), now=0.0, after=None, limit=5
    )
    assert nothing.teams == []


async def test_forms_never_appear_in_a_list(store: Store, screens: Screens) -> None:
    await store.append(edit("wo:1", status="assigned"))
    form: pycrdt.Doc[Any] = pycrdt.Doc()
    form.get("body", type=pycrdt.Text).insert(0, "f")
    await store.append(
        Write("form:1", form.get_update(), TINA_PHONE, "tina", DocIndex("form:1", "form", "wo:1"))
    )
    page = await screens.my_work("tina", ScopeFilter(ScopeKind.ALL), None, 10)
    assert [card.id for card in page.cards] == ["wo:1"]
    refs = await screens.work_order_refs("wo:1", 10)
    assert refs.forms == ["form:1"]
    assert refs.asset is None


async def test_metrics_of_work_orders_without_status_or_team(
    store: Store, screens: Screens
) -> None:
    await store.append(edit("wo:1", team=None))
    await store.append(edit("wo:2", team=None, status="completed"))
    page = await screens.region_metrics(EAST, now=0.0, after=None, limit=5)
    (team,) = page.teams
    assert (team.team, team.total, team.by_status) == (None, 2, {"": 1, "completed": 1})
    assert (team.overdue, team.completed, team.first_time_fix_rate) == (0, 1, 1.0)


async def test_an_assets_open_work_orders_newest_first(store: Store, screens: Screens) -> None:
    await store.append(edit("wo:old", status="assigned", asset_id="P-1"))
    await store.append(edit("wo:done", status="completed", asset_id="P-1"))
    await store.append(edit("wo:gone", status="cancelled", asset_id="P-1"))
    await store.append(edit("wo:other", status="new", asset_id="P-2"))
    await store.append(edit("wo:new", status=None, asset_id="P-1"))
    await store.append(edit("wo:old", status="in_progress", asset_id="P-1"))  # created first
    assert await screens.open_work_orders("P-1", 10) == ["wo:new", "wo:old"]
    assert await screens.open_work_orders("P-1", 1) == ["wo:new"]
    assert await screens.open_work_orders("P-3", 10) == []
    # Closing one takes it off the list.
    await store.append(edit("wo:new", status="closed", asset_id="P-1"))
    assert await screens.open_work_orders("P-1", 10) == ["wo:old"]
