"""The screens' read model on SQLite: what the writer keeps for the metrics, the metrics'
definitions, keyset pages, and migration 3 on a database written before it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from pathlib import Path

import pycrdt
import pytest
from sqlite_utils import Database

from fieldsync.records import DocIndex, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import MetricsPage, SQLiteScreens, SQLiteStore, Write
from fieldsync.storage._migrations import MIGRATIONS, migrate

EAST = ScopeFilter(ScopeKind.REGION, "east")
TINA_PHONE = Origin(OriginKind.DEVICE, "t")
_edits: dict[str, pycrdt.Doc] = {}


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


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    _edits.clear()
    store = SQLiteStore(tmp_path / "fieldsync.db")
    await store.open()
    yield store
    await store.close()


async def columns(store: SQLiteStore, doc: str) -> tuple[float, float | None, int]:
    rows = await store.query(
        lambda db: db.execute(
            "SELECT created_at, completed_at, reopened FROM doc_index WHERE doc = ?", (doc,)
        ).fetchall()
    )
    return rows[0]


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def test_the_writer_keeps_creation_completion_and_reopenings(store: SQLiteStore) -> None:
    for status in ("assigned", "in_progress", "completed"):
        await store.append(edit("wo:1", status=status))
    created, completed, reopened = await columns(store, "wo:1")
    assert completed is not None and created <= completed and reopened == 0
    # Closing keeps the completion time; going back to work is a reopening; completing
    # again moves the completion time on.
    await store.append(edit("wo:1", status="closed"))
    assert await columns(store, "wo:1") == (created, completed, 0)
    await store.append(edit("wo:1", status="in_progress"))
    await store.append(edit("wo:1", status="completed"))
    again = await columns(store, "wo:1")
    assert again[0] == created and again[1] is not None and again[1] >= completed
    assert again[2] == 1
    # Cancelling a completed work order ends it; it is not a reopening.
    await store.append(edit("wo:2", status="completed"))
    await store.append(edit("wo:2", status="cancelled"))
    assert (await columns(store, "wo:2"))[2] == 0


async def test_region_metrics_follow_their_definitions(store: SQLiteStore) -> None:
    screens = SQLiteScreens(store)
    for status in ("assigned", "completed", "in_progress", "completed"):  # reopened once
        await store.append(edit("wo:1", status=status))
    await store.append(edit("wo:2", status="completed"))
    await store.append(edit("wo:3", status="closed"))
    await store.append(edit("wo:4", status="assigned", due_at="2026-12-01"))
    await store.append(edit("wo:5", status="on_hold", due_at="2026-12-01T10:00:00Z"))
    await store.append(edit("wo:6", status="cancelled", due_at="2020-01-01"))
    await store.append(edit("wo:7", team="south", status="assigned", due_at="2020-01-01"))
    await store.append(edit("wo:8", region="west", team="west"))

    def north(now: str) -> Awaitable[MetricsPage]:
        return screens.region_metrics(EAST, now=at(now), after=None, limit=10)

    page = await north("2026-12-01T09:59:59")
    assert [t.team for t in page.teams] == ["north", "south"] and page.next is None
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
    rows = await store.query(
        lambda db: db.execute(
            "SELECT completed_at - created_at FROM doc_index WHERE doc IN ('wo:1','wo:2','wo:3')"
        ).fetchall()
    )
    assert team.mean_seconds_to_complete == pytest.approx(sum(r[0] for r in rows) / 3)
    assert team.conflicts_24h == 0
    assert (await north("2026-12-01T10:00:01")).teams[0].overdue == 1
    assert (await north("2026-12-02T00:00:00")).teams[0].overdue == 2
    # Pages of teams, by name.
    first = await screens.region_metrics(EAST, now=at("2026-12-01T00:00:00"), after=None, limit=1)
    assert [t.team for t in first.teams] == ["north"] and first.next == "north"
    second = await screens.region_metrics(
        EAST, now=at("2026-12-01T00:00:00"), after=first.next, limit=1
    )
    assert [t.team for t in second.teams] == ["south"] and second.next is None
    nothing = await screens.region_metrics(
        ScopeFilter(ScopeKind.NONE), now=0.0, after=None, limit=5
    )
    assert nothing.teams == []


async def test_forms_never_appear_in_a_list(store: SQLiteStore) -> None:
    await store.append(edit("wo:1", status="assigned"))
    form = pycrdt.Doc()
    form.get("body", type=pycrdt.Text).insert(0, "f")
    await store.append(
        Write("form:1", form.get_update(), TINA_PHONE, "tina", DocIndex("form:1", "form", "wo:1"))
    )
    screens = SQLiteScreens(store)
    page = await screens.my_work("tina", ScopeFilter(ScopeKind.ALL), None, 10)
    assert [card.id for card in page.cards] == ["wo:1"]
    refs = await screens.work_order_refs("wo:1", 10)
    assert refs.forms == ["form:1"] and refs.asset is None


async def test_migration_3_fills_in_documents_stored_before_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path, isolation_level=None))
    migrate(db, [m for m in MIGRATIONS if m.version < 3])
    ydoc = pycrdt.Doc()
    ydoc.get("fields", type=pycrdt.Map).update({"title": "t", "site": "Depot", "asset_id": 104.0})
    db.execute(
        "INSERT INTO updates (seq, doc, data, origin, actor, at) VALUES (1, 'wo:old', ?, 'x',"
        " 'sam', 1234.5)",
        (ydoc.get_update(),),
    )
    db.execute(
        "INSERT INTO doc_index (doc, type, wo, seq, last_seq, created_seq, log_count)"
        " VALUES ('wo:old', 'wo', 'wo:old', 1, 1, 1, 1)"
    )
    db.execute("UPDATE meta SET value = 1 WHERE key = 'seq'")
    db.close()

    store = SQLiteStore(path)
    await store.open()
    try:
        index = await store.index("wo:old")
        assert index is not None and (index.site, index.asset_id) == ("Depot", "104")
        rows = await store.query(
            lambda db: db.execute(
                "SELECT created_at, reopened FROM doc_index WHERE doc = 'wo:old'"
            ).fetchall()
        )
        assert rows == [(1234.5, 0)]
        key = await SQLiteScreens(store).cursor_key()
        assert len(key) == 32
    finally:
        await store.close()


async def test_metrics_of_work_orders_without_status_or_team(store: SQLiteStore) -> None:
    await store.append(edit("wo:1", team=None))
    await store.append(edit("wo:2", team=None, status="completed"))
    page = await SQLiteScreens(store).region_metrics(EAST, now=0.0, after=None, limit=5)
    (team,) = page.teams
    assert (team.team, team.total, team.by_status) == (None, 2, {"": 1, "completed": 1})
    assert (team.overdue, team.completed, team.first_time_fix_rate) == (0, 1, 1.0)
