"""What only the SQLite backend promises: its file, its schema migrations, its group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from fieldsync.records import DocIndex, FieldChange, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import Conflict, DeviceSeen, SQLiteBackend, StorageError, Write
from fieldsync.storage._migrations import MIGRATIONS, Migration, migrate
from fieldsync.storage._screens import SQLiteScreens
from fieldsync.storage._sqlite import SQLiteStore, Transaction


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "fieldsync.db"


@pytest.fixture
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to the store's file, opened lazily by the test."""
    conn = sqlite3.connect(path, isolation_level=None)
    yield conn
    conn.close()


RULES = Origin(OriginKind.RULES)


def update(text: str) -> bytes:
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    ydoc.get("body", type=pycrdt.Text).insert(0, text)
    return ydoc.get_update()


async def test_migrations_are_applied_once_and_recorded(
    path: Path, raw: sqlite3.Connection
) -> None:
    for _ in range(2):
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    recorded = raw.execute("SELECT version, description FROM schema_migrations").fetchall()
    assert recorded == [(m.version, m.description) for m in MIGRATIONS]
    assert migrate(Database(raw)) == []


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_a_failing_migration_leaves_nothing_behind(raw: sqlite3.Connection) -> None:
    def add_column(db: Database) -> None:
        db.table("things").add_column("colour", str)

    migrations = [
        Migration(1, "things", ("CREATE TABLE things (id INTEGER PRIMARY KEY)",)),
        Migration(2, "things have a colour", add_column),
        Migration(3, "broken", ("CREATE TABLE half (id)", "NOT SQL")),
    ]
    with pytest.raises(sqlite3.OperationalError):
        migrate(Database(raw), migrations)
    assert raw.execute("SELECT version FROM schema_migrations").fetchall() == [(1,), (2,)]
    tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
    assert "things" in tables
    assert "half" not in tables
    assert "colour" in {row[1] for row in raw.execute("PRAGMA table_info(things)")}
    assert migrate(Database(raw), migrations[:2]) == []


async def test_a_database_from_a_newer_version_is_refused(
    path: Path, raw: sqlite3.Connection
) -> None:
    migrate(Database(raw))
    raw.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    store = SQLiteStore(path)
    with pytest.raises(StorageError) as failure:
        await store.open()
    assert isinstance(failure.value.__cause__, ValueError)


async def test_an_unusable_path_fails_open(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        await SQLiteStore(tmp_path).open()


def test_the_index_table_has_a_column_for_every_index_field(raw: sqlite3.Connection) -> None:
    migrate(Database(raw))
    columns = {row[1] for row in raw.execute("PRAGMA table_info(doc_index)")}
    assert {f.name for f in fields(DocIndex)} <= columns


async def test_the_file_is_sound_after_compaction_and_reassignment(
    path: Path, raw: sqlite3.Connection
) -> None:
    store = SQLiteStore(path, compact_after_updates=5)
    await store.open()
    for i in range(40):
        who = ("u-tom", "u-sue")[i % 2]
        store.append(
            Write("wo:1", update(str(i)), RULES, "rules", DocIndex("wo:1", "wo", "wo:1", who))
        )
        store.append(
            Write(
                f"form:{i % 3}",
                update(str(i)),
                RULES,
                "rules",
                DocIndex(f"form:{i % 3}", "form", "wo:1"),
            )
        )
    await store.append(Write("wo:2", update("x"), RULES, "rules"))
    await store.close()

    assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert raw.execute("SELECT count(*) FROM snapshots").fetchone() == (4,)
    assert raw.execute("SELECT count(*) FROM scope_history").fetchone() == (39,)


async def test_batch_max_bounds_a_transaction(path: Path) -> None:
    store = SQLiteStore(path, batch_max=4)
    await store.open()
    writes = [Write(f"wo:{i}", update("x"), RULES, "rules") for i in range(40)]
    await asyncio.gather(*map(store.append, writes))
    assert (await store.stats())["commits"] >= 10
    await store.close()


async def test_a_device_row_holds_its_last_contact(path: Path, raw: sqlite3.Connection) -> None:
    store = SQLiteStore(path)
    await store.open()
    store.touch_device(DeviceSeen("d-1", "u-tom", "android", "1.4.0", 3))
    store.touch_device(DeviceSeen("d-1", "u-tom", "android", "1.5.0", 9))
    await store.close()  # queued touches are written before close returns
    row = raw.execute("SELECT subject, platform, version, last_seq, last_seen FROM devices")
    subject, platform, version, last_seq, last_seen = row.fetchone()
    assert (subject, platform, version, last_seq) == ("u-tom", "android", "1.5.0", 9)
    assert last_seen > 0


async def test_an_update_row_keeps_its_origin_and_actor(
    path: Path, raw: sqlite3.Connection
) -> None:
    store = SQLiteStore(path)
    await store.open()
    committed = await store.append(
        Write("wo:1", update("x"), Origin(OriginKind.DEVICE, "d-1"), "u-tom")
    )
    await store.close()
    row = raw.execute("SELECT seq, doc, origin, actor FROM updates").fetchone()
    assert row == (committed.seq, "wo:1", "device:d-1", "u-tom")


async def test_transact_jobs_share_the_group_commit_and_fail_alone(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    await store.open()
    try:
        await store.transact(lambda txn: txn.db.execute("CREATE TABLE notes (seq, text)"))

        def record(text: str) -> Callable[[Transaction], int]:
            def work(txn: Transaction) -> int:
                seq = txn.next_seq()
                txn.db.execute("INSERT INTO notes VALUES (?, ?)", (seq, text))
                if text == "bad":
                    raise ValueError("refused")
                return seq

            return work

        jobs = [store.transact(record(t)) for t in ("a", "bad", "b")]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert isinstance(results[1], ValueError)
        a, b = results[0], results[2]
        assert isinstance(a, int)
        assert isinstance(b, int)
        assert b == a + 1  # the bad seq is reused
        rows = await store.query(lambda db: db.execute("SELECT seq, text FROM notes").fetchall())
        assert rows == [(a, "a"), (b, "b")]
        assert await store.head() == b
    finally:
        await store.close()


async def test_the_reference_log_holds_one_entry_per_changed_field_until_compacted(
    path: Path, raw: sqlite3.Connection
) -> None:
    backend = SQLiteBackend(path)
    await backend.open()
    rows = [{"id": f"A{i}", "name": f"Pump {i}", "site": "north"} for i in range(3)]
    before = await backend.reference.import_rows("assets", rows, full=True)
    rows[0]["name"] = "Pump 0b"
    rows[1]["serial"] = "S-1"
    del rows[2]["site"]
    await backend.reference.import_rows("assets", rows, full=True)
    await backend.close()
    logged = raw.execute(
        "SELECT key, field FROM ref_changes WHERE seq > ? ORDER BY key", (before.seq,)
    ).fetchall()
    assert logged == [("A0", "name"), ("A1", "serial"), ("A2", "site")]

    await backend.open()
    await backend.reference.compact(time.time())
    await backend.close()
    assert raw.execute("SELECT COUNT(*) FROM ref_changes").fetchone() == (0,)


class Editing:
    """Successive updates of work orders, each with the status given in its index."""

    def __init__(self) -> None:
        self.ydocs: dict[str, pycrdt.Doc[Any]] = {}

    def status(self, doc: str, status: str) -> Write:
        ydoc = self.ydocs.setdefault(doc, pycrdt.Doc())
        before = ydoc.get_state()
        ydoc.get("body", type=pycrdt.Text).insert(0, "x")
        index = DocIndex(doc, "wo", doc, assignee="tina", team="north", status=status)
        return Write(doc, ydoc.get_update(before), Origin(OriginKind.DEVICE, "t"), "tina", index)


async def columns(store: SQLiteStore, doc: str) -> tuple[float, float | None, int]:
    """What the writer keeps beside the index for the screens' metrics."""
    rows: list[tuple[float, float | None, int]] = await store.query(
        lambda db: db.execute(
            "SELECT created_at, completed_at, reopened FROM doc_index WHERE doc = ?", (doc,)
        ).fetchall()
    )
    return rows[0]


async def test_the_writer_keeps_creation_completion_and_reopenings(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    edit = Editing()
    for status in ("assigned", "in_progress", "completed"):
        await store.append(edit.status("wo:1", status))
    created, completed, reopened = await columns(store, "wo:1")
    assert completed is not None
    assert created <= completed
    assert reopened == 0
    # Closing keeps the completion time; going back to work is a reopening; completing
    # again moves the completion time on.
    await store.append(edit.status("wo:1", "closed"))
    assert await columns(store, "wo:1") == (created, completed, 0)
    await store.append(edit.status("wo:1", "in_progress"))
    await store.append(edit.status("wo:1", "completed"))
    again = await columns(store, "wo:1")
    assert again[0] == created
    assert again[1] is not None
    assert again[1] >= completed
    assert again[2] == 1
    # Cancelling a completed work order ends it; it is not a reopening.
    await store.append(edit.status("wo:2", "completed"))
    await store.append(edit.status("wo:2", "cancelled"))
    assert (await columns(store, "wo:2"))[2] == 0
    await store.close()


async def test_migration_3_fills_in_documents_stored_before_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path, isolation_level=None))
    migrate(db, [m for m in MIGRATIONS if m.version < 3])
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
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
        assert index is not None
        assert (index.site, index.asset_id) == ("Depot", "104")
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


async def test_a_database_from_before_typed_origins_still_reads(
    path: Path, raw: sqlite3.Connection
) -> None:
    """Rows written when origins were free text keep their text (the field history and the
    conflicts are an audit trail) and read back as typed origins."""
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    old = [("server:rules", 3), ("server", 2), ("session:c1-ab12", 1)]
    raw.executemany(
        "INSERT INTO field_history (seq, doc, path, old, new, actor, origin, at)"
        " VALUES (?, 'wo:1', 'fields.status', '\"a\"', '\"b\"', 'tina', ?, 0)",
        [(seq, origin) for origin, seq in old],
    )
    raw.execute(
        "INSERT INTO conflicts (seq, at, doc, rule, detail, actor, origin, team)"
        " VALUES (1, 0, 'wo:1', 'status_transition', 'x', 'tina', 'session:c1-ab12', 'north')"
    )
    store = SQLiteStore(path)
    await store.open()
    try:
        history = await store.history("wo:1", None, None, 10)
        (conflict,) = await store.conflicts(ScopeFilter(ScopeKind.ALL), None, 10)
    finally:
        await store.close()
    assert [entry.origin for entry in history] == [
        RULES,
        RULES,
        Origin(OriginKind.DEVICE, "c1-ab12"),
    ]
    assert conflict.conflict.origin == Origin(OriginKind.DEVICE, "c1-ab12")


async def test_origins_are_stored_as_text_and_read_back_typed(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        for origin in (Origin(OriginKind.YWS, "c7-ff00"), Origin(OriginKind.ADAPTER, "erp")):
            change = FieldChange("fields.title", None, origin.kind.value)
            await store.append(Write("wo:1", update("x"), origin, "sam", history=(change,)))
        store.record_conflict(Conflict("wo:1", "rule", "detail", "sam", Origin(OriginKind.REST)))
        await store.append(Write("wo:2", update("x"), RULES, "rules"))  # commits the conflict
        history = await store.history("wo:1", None, None, 10)
        (conflict,) = await store.conflicts(ScopeFilter(ScopeKind.ALL), None, 10)
    finally:
        await store.close()
    assert [entry.origin for entry in history] == [
        Origin(OriginKind.ADAPTER, "erp"),
        Origin(OriginKind.YWS, "c7-ff00"),
    ]
    assert conflict.conflict.origin == Origin(OriginKind.REST)


# A document's edits as a group commit meets them: runs that leave its projection as it was, a
# status change (the screens' times), a move to another technician (a scope change, which also
# moves its form's feed position), and edits of the form itself.
_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["wo:1", "wo:2", "form:1"]),
        st.sampled_from(["assigned", "in_progress", "completed", "closed", "cancelled"]),
        st.sampled_from(["tina", "tom"]),
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(edits=_EDITS)
async def test_a_group_commit_leaves_the_rows_one_commit_per_update_would(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[str, str, str]]
) -> None:
    """The writer folds a run of a document's updates into one `doc_index` write; every row,
    commit and scope change is what writing them one transaction at a time gives."""

    def write(ydocs: dict[str, pycrdt.Doc[Any]], doc: str, status: str, assignee: str) -> Write:
        # The same client ids in both runs: the same update bytes, for the log's size.
        ydoc = ydocs.setdefault(doc, pycrdt.Doc(client_id=len(ydocs) + 1))
        before = ydoc.get_state()
        ydoc.get("body", type=pycrdt.Text).insert(0, "x" * len(status))
        if doc.startswith("form"):
            index = DocIndex(doc, "form", "wo:1")
        else:
            index = DocIndex(doc, "wo", doc, assignee=assignee, team="north", status=status)
        return Write(doc, ydoc.get_update(before), RULES, "server", index)

    async def rows(store: SQLiteStore) -> list[tuple[Any, ...]]:
        # Everything but the clock times, which differ between the two runs: whether a
        # completion is recorded stands for them.
        found: list[tuple[Any, ...]] = await store.query(
            lambda db: db.execute(
                "SELECT doc, type, wo, assignee, status, seq, last_seq, created_seq, log_count,"
                " log_bytes, reopened, completed_at IS NULL, created_at IS NULL"
                " FROM doc_index ORDER BY doc"
            ).fetchall()
        )
        return found

    results = []
    for together in (False, True):
        store = SQLiteStore(tmp_path_factory.mktemp("db") / "fieldsync.db")
        await store.open()
        try:
            ydocs: dict[str, pycrdt.Doc[Any]] = {}
            writes = [write(ydocs, *edit) for edit in edits]
            if together:
                # Queued at once: the writer takes them in one or a few group commits (how
                # many depends on when its thread runs; the rows must not).
                committed = await asyncio.gather(*(store.append(w) for w in writes))
            else:
                committed = [await store.append(w) for w in writes]
            results.append((committed, await rows(store)))
        finally:
            await store.close()
    assert results[1] == results[0]
