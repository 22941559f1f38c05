"""What only the PostgreSQL backend promises: several nodes on one database (a feed that never
skips a late commit, migrations applied once), its recorded migrations, its errors."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pycrdt
import pytest
from pycrdt import Map

from fieldsync.app import BACKEND
from fieldsync.records import DocIndex, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import (
    Backend,
    PostgresBackend,
    Screens,
    SQLiteBackend,
    StorageError,
    Write,
)
from fieldsync.storage._migrations import MIGRATIONS as SQLITE_MIGRATIONS
from fieldsync.storage._postgres import PgTransaction
from fieldsync.storage._postgres_migrations import MIGRATIONS
from tests.harness import running_issuer, running_server, work_order
from tests.storage.conftest import PostgresSchemas

ALL = ScopeFilter(ScopeKind.ALL)


@pytest.fixture
def url(postgres_schemas: PostgresSchemas) -> Iterator[str]:
    """A database of the test's own (a schema of the session's database)."""
    schema = postgres_schemas.take()
    yield postgres_schemas.url(schema)
    postgres_schemas.give_back(schema)


def new_work_order(doc: str, node: int) -> Write:
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    ydoc.get("body", type=pycrdt.Text).insert(0, doc)
    return Write(
        doc,
        ydoc.get_update(),
        Origin(OriginKind.DEVICE, f"d-{node}"),
        "u-tom",
        DocIndex(doc, "wo", doc, "u-tom", "north", "east"),
    )


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_reader_sees_every_commit_of_several_nodes_exactly_once(
    url: str, seed: int
) -> None:
    """Four nodes write at once, their transactions held open for random times after they
    drew their numbers (so commits would land out of number order if they could), while readers
    on a fifth node follow the feed page by page: each sees every committed document once."""
    rng = random.Random(seed)
    nodes = [PostgresBackend(url) for _ in range(5)]
    for node in nodes:
        await node.open()
    writers, reader = nodes[:4], nodes[4].store
    committed: dict[str, int] = {}
    writing = asyncio.Event()
    pages_while_writing = 0

    async def late_commit(txn: PgTransaction) -> None:
        await txn.conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))

    async def write(n: int) -> None:
        store = writers[n].store
        for burst in range(12):
            pending = {
                f"wo:{n}-{burst}-{i}": store.append(new_work_order(f"wo:{n}-{burst}-{i}", n))
                for i in range(rng.randint(1, 6))
            }
            held = store.transact(late_commit)
            for doc, done in pending.items():
                committed[doc] = (await done).seq
            await held

    async def follow(limit: int) -> dict[str, int]:
        nonlocal pages_while_writing
        seen: dict[str, int] = {}
        since = 0
        while True:
            finishing = not writing.is_set()
            page = await reader.changes(ALL, since, limit)
            pages_while_writing += not finishing
            for doc in page.docs:
                assert doc.id not in seen, f"{doc.id} returned twice"
                seen[doc.id] = doc.seq
            assert page.upto >= since
            since = page.upto
            if finishing and not page.more:
                return seen

    try:
        writing.set()
        readers = [asyncio.create_task(follow(limit)) for limit in (1, 3, 50)]
        await asyncio.gather(*(write(n) for n in range(len(writers))))
        writing.clear()
        results = await asyncio.gather(*readers)
        assert pages_while_writing > 0, "the readers must have read while the nodes wrote"
        assert sorted(committed.values()) == list(range(1, len(committed) + 1))
        assert results == [committed] * 3
        assert await reader.head() == len(committed)
    finally:
        for node in nodes:
            await node.close()


async def test_nodes_opening_together_apply_each_migration_once(url: str) -> None:
    nodes = [PostgresBackend(url) for _ in range(3)]
    await asyncio.gather(*(node.open() for node in nodes))
    for node in nodes:
        await node.close()
    with psycopg.connect(url) as conn:
        recorded = conn.execute(
            "SELECT version, description FROM schema_migrations ORDER BY version"
        ).fetchall()
    assert recorded == [(m.version, m.description) for m in MIGRATIONS]


def test_migrations_bring_the_same_concerns_as_sqlites() -> None:
    assert [(m.version, m.description) for m in MIGRATIONS] == [
        (m.version, m.description) for m in SQLITE_MIGRATIONS
    ]


async def test_a_database_from_a_newer_version_is_refused(url: str) -> None:
    backend = PostgresBackend(url)
    await backend.open()
    await backend.close()
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (99, 'x', 0)"
        )
    with pytest.raises(StorageError) as refused:
        await PostgresBackend(url).open()
    assert isinstance(refused.value.__cause__, ValueError)
    assert "99" in str(refused.value.__cause__)


async def test_an_unreachable_server_fails_open_without_naming_the_password() -> None:
    backend = PostgresBackend("postgresql://fieldsync:s3cret-pw@127.0.0.1:1/fieldsync")
    with pytest.raises(StorageError) as failed:
        await backend.open()
    assert "s3cret-pw" not in str(failed.value)
    with pytest.raises(StorageError):
        backend.store.append(new_work_order("wo:1", 0))


async def test_a_work_order_written_through_one_node_is_served_by_another(
    url: str, tmp_path: Path
) -> None:
    """Two servers (`backend_for` picks PostgreSQL from `database_url`) on one database: what
    a supervisor creates through the first reaches a technician connected to the second."""
    async with (
        running_issuer() as issuer,
        running_server(tmp_path / "a", issuer, database_url=url, cluster_secret="s") as node_a,
        running_server(tmp_path / "b", issuer, database_url=url, cluster_secret="s") as node_b,
    ):
        assert isinstance(node_a.app[BACKEND], PostgresBackend)
        sam = node_a.client("sam")
        await sam.start()
        try:
            sam.doc("wo:1").apply_update(work_order("wo:1", assignee="tina").get_update())
            await sam.wait_acked("wo:1")
        finally:
            await sam.close()
        tina = node_b.client("tina")
        await tina.start()
        try:
            await tina.wait_synced("wo:1")
            fields = tina.doc("wo:1").get("fields", type=Map)
            assert (fields["assignee"], fields["title"]) == ("tina", "Inspect pump wo:1")
        finally:
            await tina.close()


async def test_a_node_whose_connections_are_cut_fails_only_the_write_in_flight(url: str) -> None:
    backend = PostgresBackend(url)
    await backend.open()
    store = backend.store
    try:
        first = await store.append(new_work_order("wo:1", 0))
        # What a database restart or failover does to every session of this node.
        with psycopg.connect(url, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert cut
        # The batch on the dead connection fails (not acknowledged: the device sends again)...
        with pytest.raises(StorageError):
            await store.append(new_work_order("wo:2", 0))
        # ...and the next ones commit on a new connection; reads get live connections too.
        again = await store.append(new_work_order("wo:2", 0))
        assert again.seq == first.seq + 1
        assert await store.head() == again.seq
        assert (await store.changes(ALL, 0, 10)).upto == again.seq
    finally:
        await backend.close()


async def test_nodes_compacting_one_document_keep_every_edit(url: str) -> None:
    """Two nodes append to one document and each compacts it as its log grows: the snapshot
    and the log left after it still hold every edit."""
    nodes = [PostgresBackend(url, compact_after_updates=3) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        editors: list[pycrdt.Doc[Any]] = [pycrdt.Doc(client_id=n + 1) for n in range(2)]

        async def edit(n: int) -> None:
            text = editors[n].get("body", type=pycrdt.Text)
            for i in range(30):
                before = editors[n].get_state()
                text += f"{n}.{i} "
                update = editors[n].get_update(before)
                write = Write("wo:1", update, Origin(OriginKind.DEVICE, f"d-{n}"), "u-tom")
                await nodes[n].store.append(write)

        await asyncio.gather(edit(0), edit(1))
        stored = await nodes[0].store.load("wo:1")
        assert stored is not None
        assert stored.snapshot is not None
        merged: pycrdt.Doc[Any] = pycrdt.Doc()
        for data in [stored.snapshot, *stored.updates]:
            merged.apply_update(data)
        body = str(merged.get("body", type=pycrdt.Text))
        assert all(f"{n}.{i} " in body for n in range(2) for i in range(30))
        assert len(stored.updates) < 30
    finally:
        for node in nodes:
            await node.close()


async def test_full_imports_of_one_dataset_on_two_nodes_take_turns(url: str) -> None:
    """A full import deletes what it lacks: two at once on different nodes would delete each
    other's rows; they take turns, and the rows are one import's, whole."""
    nodes = [PostgresBackend(url, reference_chunk_rows=2) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        sets = [[{"id": f"{side}{i}", "n": i} for i in range(9)] for side in "ab"]
        results = await asyncio.gather(
            *(
                node.reference.import_rows("assets", rows, full=True)
                for node, rows in zip(nodes, sets, strict=True)
            )
        )
        assert all(result.done and result.created == 9 for result in results)

        def keys(head: object, rows: Iterator[tuple[str, str]]) -> set[str]:
            return {key for key, _ in rows}

        stored = await nodes[0].reference.snapshot("assets", keys)
        assert stored in ({f"a{i}" for i in range(9)}, {f"b{i}" for i in range(9)})
        assert sorted(r.deleted for r in results) == [0, 9]
    finally:
        for node in nodes:
            await node.close()


async def test_the_screens_answer_as_sqlites_do(url: str, tmp_path: Path) -> None:
    """The same writes to both backends, then every screen page by page: the same answers,
    with keys chosen where collations disagree (case, punctuation, '~', no due time)."""
    rng = random.Random(7)
    backends: list[Backend] = [SQLiteBackend(tmp_path / "screens.db"), PostgresBackend(url)]
    for backend in backends:
        await backend.open()
    teams = ["north", "North", "n-1", "n_1", "Ödland", None]
    people = ["tina", "Tom", "t.om", None]
    statuses = ["assigned", "in_progress", "completed", "closed", "cancelled", "on_hold", None]
    dues = ["2026-12-01", "2026-12-01T10:00:00Z", "2026-11-30T23:59:59Z", "~x", "a", None]
    try:
        for n in range(80):
            doc = f"wo:{rng.choice('aAbB-_')}{n}"
            for _ in range(rng.randint(1, 3)):
                index = DocIndex(
                    doc,
                    "wo",
                    doc,
                    assignee=rng.choice(people),
                    team=rng.choice(teams),
                    region=rng.choice(["east", "East"]),
                    status=rng.choice(statuses),
                    due_at=rng.choice(dues),
                )
                write = new_work_order(doc, 0)
                write = Write(doc, write.data, write.origin, write.actor, index)
                for backend in backends:
                    await backend.store.append(write)
        now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC).timestamp()

        async def everything(screens: Screens) -> list[object]:
            answers: list[object] = []
            for scope in (
                ALL,
                ScopeFilter(ScopeKind.REGION, "east"),
                ScopeFilter(ScopeKind.TEAM, "north"),
                ScopeFilter(ScopeKind.NONE),
            ):
                for limit in (1, 7, 100):
                    after: str | None = None
                    while True:
                        page = await screens.region_metrics(
                            scope, now=now, after=after, limit=limit
                        )
                        # Times are each server's clock at the write: whether one is known.
                        known = [
                            replace(t, mean_seconds_to_complete=t.mean_seconds_to_complete and 0.0)
                            for t in page.teams
                        ]
                        answers.append(replace(page, teams=known))
                        if page.next is None:
                            break
                        after = page.next
                    for status in (None, "completed"):
                        position = None
                        while True:
                            cards = await screens.team_queue(
                                scope, status=status, assignee=None, after=position, limit=limit
                            )
                            answers.append(cards)
                            if cards.next is None:
                                break
                            position = cards.next
                    answers.append(await screens.my_work("tina", scope, None, limit))
            return answers

        sqlite, postgres = [await everything(backend.screens) for backend in backends]
        assert len(sqlite) == len(postgres)
        for expected, got in zip(sqlite, postgres, strict=True):
            assert got == expected
    finally:
        for backend in backends:
            await backend.close()
