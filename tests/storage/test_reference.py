"""Reference data in storage: imports record only real field changes, pages of changes replay
to the stored rows, compaction moves the horizon, snapshots are consistent at their seq."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldsync.storage import (
    Backend,
    ImportResult,
    InvalidRow,
    ReferencePage,
    ReferenceStore,
    ResyncRequired,
    SnapshotHead,
    Store,
)
from tests.storage.conftest import BackendFactory

Rows = dict[str, dict[str, Any]]


@pytest.fixture
async def backend(make_backend: BackendFactory) -> AsyncIterator[Backend]:
    """Imports of three rows a chunk, so a few rows already make several."""
    backend = make_backend(reference_chunk_rows=3)
    await backend.open()
    yield backend
    await backend.close()


def assets(n: int, **changed: Any) -> list[dict[str, Any]]:
    return [{"id": f"A{i:03d}", "name": f"Pump {i}", "site": "north", **changed} for i in range(n)]


class Device:
    """What a device does with pages: the storage's side of `fieldsync.client.ReferenceReplica`,
    written out again here so that the two are checked against each other."""

    def __init__(self) -> None:
        self.rows: Rows = {}
        self.since = 0
        self.pages = 0

    def apply(self, page: ReferencePage) -> None:
        assert page.since == self.since
        keys = [change.key for change in page.changes] + page.deleted
        assert len(keys) == len(set(keys)), "a key appears once per page"
        for key in page.deleted:
            self.rows.pop(key, None)
        for change in page.changes:
            if change.whole:
                self.rows[change.key] = dict(change.fields)
                continue
            assert change.key in self.rows, "a patch is for a row the device holds"
            self.rows[change.key].update(change.fields)
            for field in change.removed:
                self.rows[change.key].pop(field, None)  # it may have come and gone in the page
        self.since = page.next
        self.pages += 1

    async def sync(self, reference: ReferenceStore, dataset: str, limit: int) -> None:
        while True:
            try:
                page = await reference.changes(dataset, self.since, limit)
            except ResyncRequired:
                self.rows, self.since = await snapshot(reference, dataset)
                continue
            self.apply(page)
            if not page.more:
                return


async def snapshot(reference: ReferenceStore, dataset: str) -> tuple[Rows, int]:
    def take(head: SnapshotHead, rows: Iterator[tuple[str, str]]) -> tuple[Rows, int]:
        return {key: orjson.loads(data) for key, data in rows}, head.seq

    return await reference.snapshot(dataset, take)


async def read_all(reference: ReferenceStore, dataset: str, since: int, limit: int) -> Device:
    device = Device()
    device.since = since
    await device.sync(reference, dataset, limit)
    return device


# --- imports record only real changes ---------------------------------------------------------


async def test_a_full_import_creates_rows_and_an_identical_one_records_nothing(
    reference: ReferenceStore,
) -> None:
    first = await reference.import_rows("assets", assets(7), full=True)
    assert (first.rows, first.created, first.updated, first.deleted) == (7, 7, 0, 0)
    assert first.done
    assert first.seq > 0
    again = await reference.import_rows("assets", reversed(assets(7)), full=True)
    assert (again.unchanged, again.created, again.updated, again.deleted, again.seq) == (
        7,
        0,
        0,
        0,
        0,
    )
    page = await reference.changes("assets", first.seq, 100)
    assert (page.changes, page.deleted, page.more) == ([], [], False)


async def test_only_the_fields_that_changed_are_recorded(reference: ReferenceStore) -> None:
    rows = assets(5)
    rows[1]["specs"] = {"kw": 4, "rpm": 1500}
    before = await reference.import_rows("assets", rows, full=True)
    rows[1]["specs"] = {"rpm": 1500, "kw": 4}  # the same value, its keys in another order
    rows[2]["name"] = "Pump 2b"
    rows[3]["serial"] = "S-3"  # a new field
    del rows[4]["site"]  # a field gone
    after = await reference.import_rows("assets", rows, full=True)
    assert (after.updated, after.unchanged) == (3, 2)
    page = await reference.changes("assets", before.seq, 100)
    assert {c.key: (c.fields, c.removed, c.whole) for c in page.changes} == {
        "A002": ({"name": "Pump 2b"}, (), False),
        "A003": ({"serial": "S-3"}, (), False),
        "A004": ({}, ("site",), False),
    }


async def test_rows_are_read_by_key(reference: ReferenceStore) -> None:
    await reference.import_rows("assets", assets(1200), full=True)
    keys = [f"A{i:03d}" for i in (0, 7, 1199)] + ["nope", "A007"]
    found = await reference.rows("assets", keys)
    assert sorted(found) == ["A000", "A007", "A1199"]
    assert found["A007"] == {"id": "A007", "name": "Pump 7", "site": "north"}
    assert await reference.rows("parts", keys) == {}
    assert await reference.rows("assets", []) == {}


async def test_a_full_import_deletes_the_rows_it_lacks_and_a_partial_one_does_not(
    reference: ReferenceStore,
) -> None:
    base = await reference.import_rows("assets", assets(6), full=True)
    partial = await reference.import_rows("assets", [{"id": "A009", "name": "New"}], full=False)
    assert (partial.created, partial.deleted) == (1, 0)
    full = await reference.import_rows("assets", assets(6)[2:], full=True)
    assert (full.deleted, full.unchanged) == (3, 4)  # A000, A001 and the partial's A009
    page = await reference.changes("assets", base.seq, 100)
    assert sorted(page.deleted) == ["A000", "A001"]  # A009 came and went: only its deletion
    assert [c.key for c in page.changes] == []
    rows, _ = await snapshot(reference, "assets")
    assert sorted(rows) == ["A002", "A003", "A004", "A005"]


async def test_a_key_given_twice_counts_once_with_its_last_row(reference: ReferenceStore) -> None:
    rows = [*assets(4), {"id": "A001", "name": "Twice"}, {"id": "A003", "name": "Again"}]
    result = await reference.import_rows("assets", rows, full=True)
    # In chunks of 3: A003 twice in the second chunk is one new row; A001 again is an update.
    assert (result.rows, result.duplicates, result.created, result.updated) == (6, 2, 4, 1)
    stored, _ = await snapshot(reference, "assets")
    assert stored["A001"] == {"id": "A001", "name": "Twice"}
    assert len(stored) == 4


async def test_integer_keys_are_keys_and_bad_rows_are_refused(reference: ReferenceStore) -> None:
    result = await reference.import_rows("parts", [{"no": 7, "qty": 1}], key="no", full=True)
    assert result.created == 1
    stored, _ = await snapshot(reference, "parts")
    assert stored == {"7": {"no": 7, "qty": 1}}
    bads: list[list[Any]] = [
        [{"qty": 1}],
        [{"no": True}],
        [{"no": ""}],
        ["a string"],
        [{"no": "x", "v": {1}}],
    ]
    for bad in bads:
        with pytest.raises(InvalidRow, match="row 1"):
            await reference.import_rows("parts", bad, key="no", full=False)


async def test_a_bad_row_stops_a_full_import_before_it_deletes_anything(
    reference: ReferenceStore,
) -> None:
    await reference.import_rows("assets", assets(9), full=True)
    reports: list[ImportResult] = []
    rows = [*assets(4, site="south"), {"name": "no id"}]
    with pytest.raises(InvalidRow, match="row 5"):
        await reference.import_rows("assets", rows, full=True, progress=reports.append)
    # The first chunk (3 rows) was applied, the bad row's chunk not, and nothing deleted.
    assert (reports[-1].rows, reports[-1].updated, reports[-1].done) == (3, 3, False)
    stored, _ = await snapshot(reference, "assets")
    assert len(stored) == 9
    assert [stored[f"A{i:03d}"]["site"] for i in range(5)] == ["south"] * 3 + ["north"] * 2


async def test_imports_report_progress_per_chunk(reference: ReferenceStore) -> None:
    async def rows() -> AsyncIterator[dict[str, Any]]:
        for row in assets(8):
            yield row

    reports: list[ImportResult] = []
    await reference.import_rows("assets", rows(), full=True, progress=reports.append)
    assert [(r.rows, r.done) for r in reports] == [(3, False), (6, False), (8, False), (8, True)]


# --- pages --------------------------------------------------------------------------------------


async def test_pages_end_between_row_changes_and_chain_by_next(reference: ReferenceStore) -> None:
    await reference.import_rows("assets", assets(10), full=True)
    whole = await read_all(reference, "assets", 0, 1000)
    assert whole.pages == 1
    paged = await read_all(reference, "assets", 0, 3)
    assert paged.pages == 4
    assert paged.rows == whole.rows
    first = await reference.changes("assets", 0, 3)
    assert first.more
    assert len(first.changes) == 3
    second = await reference.changes("assets", first.next, 3)
    assert second.since == first.next
    assert {c.key for c in first.changes}.isdisjoint(c.key for c in second.changes)


async def test_a_page_folds_each_keys_changes_into_one(reference: ReferenceStore) -> None:
    start = await reference.import_rows("assets", assets(3), full=True)
    await reference.import_rows("assets", assets(2), full=True)  # A002 deleted
    await reference.import_rows("assets", [{"id": "A002", "name": "Back"}], full=False)
    await reference.import_rows("assets", [{"id": "A005", "name": "Brief"}], full=False)
    await reference.import_rows("assets", assets(3)[:2], full=True)  # A002, A005 deleted
    await reference.import_rows("assets", [{"id": "A001", "name": "B"}], full=False)
    await reference.import_rows("assets", [{"id": "A001", "name": "C", "x": 1}], full=False)
    page = await reference.changes("assets", start.seq, 100)
    # A002 was there at `since` and is gone; A005 came and went within the page: nothing to do.
    assert page.deleted == ["A002"]
    assert [(c.key, c.fields, c.removed, c.whole) for c in page.changes] == [
        ("A001", {"name": "C", "x": 1}, ("site",), False)
    ]
    await reference.import_rows("assets", [{"id": "A002", "v": 2}], full=False)
    page = await reference.changes("assets", start.seq, 100)
    assert [(c.key, c.fields, c.whole) for c in page.changes if c.key == "A002"] == [
        ("A002", {"id": "A002", "v": 2}, True)  # deleted, then created again: replaced whole
    ]
    assert "A002" not in page.deleted


async def test_the_last_page_ends_at_the_head(store: Store, reference: ReferenceStore) -> None:
    await reference.import_rows("assets", assets(2), full=True)
    await reference.import_rows("parts", [{"id": "P1"}], full=True)
    page = await reference.changes("assets", 0, 10)
    assert page.next == await store.head()


# --- compaction, resync, snapshots --------------------------------------------------------------


async def test_compaction_moves_the_horizon_and_a_snapshot_plus_changes_converges(
    store: Store, reference: ReferenceStore
) -> None:
    await reference.import_rows("assets", assets(10), full=True)
    device = await read_all(reference, "assets", 0, 4)
    kept_since = device.since
    await reference.import_rows("assets", assets(8, site="east"), full=True)
    horizons = await reference.compact(time.time())
    head = await store.head()
    assert horizons == {"assets": head}
    for stale in (0, kept_since, head + 1):
        with pytest.raises(ResyncRequired) as refused:
            await reference.changes("assets", stale, 10)
        assert refused.value.horizon == head
    # A device that had synced: snapshot, then the changes after it, ends where the server is.
    rows, seq = await snapshot(reference, "assets")
    assert seq == head
    assert len(rows) == 8
    await reference.import_rows("assets", [{"id": "A000", "name": "Late"}], full=False)
    device.rows, device.since = rows, seq
    await device.sync(reference, "assets", 4)
    assert device.rows == (await snapshot(reference, "assets"))[0]
    assert device.rows["A000"] == {"id": "A000", "name": "Late"}


async def test_compaction_keeps_what_is_younger_than_its_cut(
    store: Store, reference: ReferenceStore
) -> None:
    old = await reference.import_rows("assets", assets(4), full=True)
    device = await read_all(reference, "assets", 0, 10)
    cut = time.time()
    # The marks record commit times; make sure the next commit is after the cut.
    while time.time() <= cut:  # noqa: ASYNC110 - a clock tick, not an event
        await asyncio.sleep(0.001)
    await reference.import_rows("assets", assets(4, site="west"), full=True)
    assert await reference.compact(cut) == {"assets": old.seq}
    await device.sync(reference, "assets", 10)
    assert {key: row["site"] for key, row in device.rows.items()} == dict.fromkeys(
        (f"A{i:03d}" for i in range(4)), "west"
    )
    assert device.since == await store.head()
    # Nothing more expired: compacting again changes nothing.
    assert await reference.compact(cut) == {"assets": old.seq}


async def test_a_snapshot_is_the_rows_at_its_seq(store: Store, reference: ReferenceStore) -> None:
    await reference.import_rows("assets", assets(5), full=True)
    rows, seq = await snapshot(reference, "assets")
    assert seq == await store.head()
    assert rows == {row["id"]: row for row in assets(5)}
    info = await reference.info("assets")
    assert info is not None
    assert (info.rows, info.seq, info.horizon) == (5, seq, 0)
    assert await reference.info("nothing") is None
    assert await snapshot(reference, "nothing") == ({}, seq)


# --- the property -------------------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(6)]
values = st.one_of(
    st.integers(-2, 2),
    st.sampled_from(["", "x", "y"]),
    st.none(),
    st.lists(st.integers(0, 1), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 1), max_size=2),
)
rows_strategy = st.lists(
    st.tuples(
        st.sampled_from(KEYS), st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3)
    ),
    max_size=8,
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("full"), rows_strategy),
        st.tuples(st.just("partial"), rows_strategy),
        st.tuples(st.just("sync"), st.integers(1, 4)),
        st.tuples(st.just("compact"), st.none()),
    ),
    max_size=14,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=operations, chunk=st.integers(1, 4))
async def test_a_device_applying_pages_ends_with_the_servers_rows(
    make_backend: BackendFactory, ops: list[tuple[str, Any]], chunk: int
) -> None:
    async with make_backend.fresh(reference_chunk_rows=chunk) as backend:
        reference = backend.reference
        device = Device()
        model: Rows = {}
        for op, argument in ops:
            if op in ("full", "partial"):
                rows = [{"id": key, **fields} for key, fields in argument]
                await reference.import_rows("d", rows, full=op == "full")
                given = {row["id"]: row for row in rows}
                model = given if op == "full" else {**model, **given}
            elif op == "sync":
                await device.sync(reference, "d", argument)
            else:
                await reference.compact(time.time())
        stored, _ = await snapshot(reference, "d")
        assert stored == model
        await device.sync(reference, "d", 3)
        assert device.rows == model


async def test_changes_need_a_positive_limit(reference: ReferenceStore) -> None:
    with pytest.raises(ValueError, match="limit must be at least 1"):
        await reference.changes("assets", 0, 0)
