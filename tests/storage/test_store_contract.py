"""The `Documents` contract (updates, snapshots, the index, the change feed) every backend
must keep, driven with real pycrdt documents."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldsync.records import DocIndex, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import (
    Committed,
    DeviceSeen,
    ScopeChange,
    StorageError,
    Store,
    StoredDoc,
    Write,
)
from tests.storage.conftest import BackendFactory

ALL = ScopeFilter(ScopeKind.ALL)
NONE = ScopeFilter(ScopeKind.NONE)


def assignee(value: str) -> ScopeFilter:
    return ScopeFilter(ScopeKind.ASSIGNEE, value)


def work_order(
    n: int, assignee: str | None = None, team: str | None = None, region: str | None = None
) -> DocIndex:
    return DocIndex(f"wo:{n}", "wo", f"wo:{n}", assignee, team, region, title=f"job {n}")


def form(n: int, wo: int) -> DocIndex:
    return DocIndex(f"form:{n}", "form", f"wo:{wo}")


class Editor:
    """A client's copy of a document; each edit becomes the update bytes a store is given."""

    def __init__(self, doc: str) -> None:
        self.doc = doc
        self.ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.text = self.ydoc.get("body", type=pycrdt.Text)

    def type(self, text: str, index: DocIndex | None = None) -> Write:
        before = self.ydoc.get_state()
        self.text += text
        return self._write(before, index)

    def erase(self, count: int) -> Write:
        before = self.ydoc.get_state()
        del self.text[:count]
        return self._write(before, None)

    def _write(self, before: bytes, index: DocIndex | None) -> Write:
        return Write(
            self.doc, self.ydoc.get_update(before), Origin(OriginKind.DEVICE, "d-1"), "u-tom", index
        )


def put(index: DocIndex) -> Write:
    return Editor(index.doc).type("x", index)


def rebuild(stored: StoredDoc | None) -> pycrdt.Doc[Any]:
    assert stored is not None
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    for update in [stored.snapshot or b"\x00\x00", *stored.updates]:
        ydoc.apply_update(update)
    return ydoc


def same_state(a: pycrdt.Doc[Any], b: pycrdt.Doc[Any]) -> bool:
    text = [str(ydoc.get("body", type=pycrdt.Text)) for ydoc in (a, b)]
    return a.get_state() == b.get_state() and text[0] == text[1]


async def read_all(
    store: Store, scope: ScopeFilter, since: int, limit: int
) -> tuple[dict[str, int], set[str], int]:
    """Follow pages from `since` to the end: every doc once with its seq, the removed, the end."""
    seen: dict[str, int] = {}
    removed: set[str] = set()
    while True:
        page = await store.changes(scope, since, limit)
        assert page.since == since <= page.upto
        assert [d.seq for d in page.docs] == sorted(d.seq for d in page.docs)
        assert all(since < d.seq <= page.upto for d in page.docs)
        for doc in page.docs:
            assert doc.id not in seen, f"{doc.id} returned twice"
            seen[doc.id] = doc.seq
        removed.update(page.removed)
        since = page.upto
        if not page.more:
            return seen, removed, since


# Sequence and durability


async def test_seqs_strictly_increase_and_survive_reopen(make_backend: BackendFactory) -> None:
    # Compacting after two updates empties the log, so a seq derived from it would restart.
    backend = make_backend(compact_after_updates=2)
    await backend.open()
    store = backend.store
    editor = Editor("wo:1")
    seqs = [(await store.append(editor.type(c))).seq for c in "abcd"]
    await store.append(put(work_order(2)))
    assert seqs == sorted(set(seqs))
    assert seqs[0] >= 1
    head = await store.head()
    await backend.close()

    backend = make_backend(compact_after_updates=2)
    await backend.open()
    store = backend.store
    assert await store.head() == head
    assert (await store.append(editor.type("e"))).seq > head
    assert same_state(rebuild(await store.load("wo:1")), editor.ydoc)
    await backend.close()


async def test_an_empty_store(store: Store) -> None:
    assert await store.head() == 0
    assert await store.load("wo:1") is None
    assert await store.index("wo:1") is None
    assert await store.scope_index("form:1") is None
    page = await store.changes(ALL, 0, 10)
    assert (page.docs, page.removed, page.upto, page.more) == ([], [], 0, False)


async def test_commit_order_is_append_order(store: Store) -> None:
    editors = [Editor(f"wo:{n}") for n in range(5)]
    pending = [store.append(editors[i % 5].type(str(i))) for i in range(200)]
    seqs = [committed.seq for committed in await asyncio.gather(*pending)]
    assert seqs == list(range(seqs[0], seqs[0] + 200))
    for editor in editors:
        assert same_state(rebuild(await store.load(editor.doc)), editor.ydoc)


async def test_concurrent_appends_are_group_committed_and_durable(
    make_backend: BackendFactory,
) -> None:
    backend = make_backend()
    await backend.open()
    store = backend.store
    editors = [Editor(f"form:{n}") for n in range(100)]

    async def type_into(editor: Editor) -> list[int]:
        return [(await store.append(editor.type(f"{i},"))).seq for i in range(20)]

    seqs = [s for run in await asyncio.gather(*map(type_into, editors)) for s in run]
    stats = await store.stats()
    await backend.close()

    assert sorted(seqs) == list(range(1, 2001))
    assert stats["commits"] <= 2000 // 10, stats
    backend = make_backend()
    await backend.open()
    store = backend.store
    assert (await store.stats())["updates"] == 2000
    assert await store.head() == 2000
    for editor in editors:
        assert same_state(rebuild(await store.load(editor.doc)), editor.ydoc)
    await backend.close()


async def test_a_failing_write_fails_its_batch_and_later_writes_commit(store: Store) -> None:
    editor = Editor("wo:1")
    before = store.append(editor.type("kept? "))
    bad = store.append(
        Write("wo:2", cast(bytes, {"not": "bytes"}), Origin(OriginKind.RULES), "rules")
    )
    with pytest.raises(StorageError) as failure:
        await bad
    assert failure.value.__cause__ is not None
    # `before` may have shared the failed transaction or committed ahead of it: either way
    # its outcome is reported, never lost.
    outcome = (await asyncio.gather(before, return_exceptions=True))[0]
    assert isinstance(outcome, Committed | StorageError)

    retry = Editor("wo:1")
    after = await store.append(retry.type("kept"))
    assert await store.head() == after.seq
    assert await store.index("wo:2") is None
    stored = await store.load("wo:1")
    assert stored is not None
    assert stored.seq == after.seq
    assert len(stored.updates) == (2 if isinstance(outcome, Committed) else 1)


async def test_appending_to_a_closed_store_raises(make_backend: BackendFactory) -> None:
    backend = make_backend()
    store = backend.store
    with pytest.raises(StorageError):
        store.append(put(work_order(1)))
    await backend.open()
    await backend.close()
    await backend.close()  # closing twice is harmless
    with pytest.raises(StorageError):
        store.append(put(work_order(1)))


# Loading and the index


async def test_load_returns_what_rebuilds_the_document(store: Store) -> None:
    editor = Editor("wo:1")
    await store.append(editor.type("hello ", work_order(1, "u-tom")))
    last = await store.append(editor.type("world"))
    stored = await store.load("wo:1")
    assert stored is not None
    assert (stored.seq, stored.index) == (last.seq, work_order(1, "u-tom"))
    assert same_state(rebuild(stored), editor.ydoc)


async def test_load_many_loads_each_document_as_load_does(store: Store) -> None:
    editors = [Editor(f"wo:{n}") for n in range(3)]
    for n, editor in enumerate(editors):
        await store.append(editor.type(f"text {n}", work_order(n, "u-tom")))
    await store.append(editors[1].type(" and more"))
    loaded = await store.load_many(["wo:2", "wo:0", "wo:missing", "wo:1"])
    assert list(loaded) == ["wo:2", "wo:0", "wo:missing", "wo:1"]
    assert loaded["wo:missing"] is None
    for n, editor in enumerate(editors):
        assert loaded[f"wo:{n}"] == await store.load(f"wo:{n}")
        assert same_state(rebuild(loaded[f"wo:{n}"]), editor.ydoc)


async def test_a_document_written_without_an_index_is_typed_by_its_id(store: Store) -> None:
    await store.append(Editor("wo:7").type("x"))
    await store.append(Editor("form:3").type("x"))
    assert await store.index("wo:7") == DocIndex("wo:7", "wo", "wo:7")
    assert await store.index("form:3") == DocIndex("form:3", "form", None)


async def test_a_write_without_an_index_keeps_the_stored_one(store: Store) -> None:
    editor = Editor("wo:1")
    await store.append(editor.type("a", work_order(1, "u-tom", "north-1")))
    await store.append(editor.type("b"))
    assert await store.index("wo:1") == work_order(1, "u-tom", "north-1")


async def test_scope_index_is_the_work_orders_row(store: Store) -> None:
    for write in (put(work_order(1, "u-tom")), put(form(1, wo=1)), put(form(2, wo=404))):
        await store.append(write)
    assert await store.scope_index("wo:1") == work_order(1, "u-tom")
    assert await store.scope_index("form:1") == work_order(1, "u-tom")
    assert await store.scope_index("form:2") is None
    assert await store.scope_index("form:404") is None


async def test_devices_are_recorded_with_the_next_commit(store: Store) -> None:
    store.touch_device(DeviceSeen("d-1", "u-tom", "android", "1.4.0", 0))
    store.touch_device(DeviceSeen("d-2", "u-sue", "ios", "1.4.0", 0))
    store.touch_device(DeviceSeen("d-1", "u-tom", "android", "1.5.0", 12))
    await store.append(put(work_order(1)))
    assert (await store.stats())["devices"] == 2
    # As an operator lists them (`fieldsync devices`): each once, as last seen.
    listed = {d.device_id: d for d in await store.devices()}
    assert (listed["d-1"].subject, listed["d-1"].version, listed["d-1"].last_seq) == (
        "u-tom",
        "1.5.0",
        12,
    )
    assert [d.device_id for d in await store.devices("u-sue")] == ["d-2"]
    assert len(await store.devices(limit=1)) == 1


async def test_stats_count_what_is_stored(store: Store) -> None:
    for write in (put(work_order(1)), put(form(1, wo=1)), Editor("wo:1").type("again")):
        await store.append(write)
    stats = await store.stats()
    assert {k: stats[k] for k in ("docs", "updates", "snapshots", "head")} == {
        "docs": 2,
        "updates": 3,
        "snapshots": 0,
        "head": 3,
    }


# Changes feed


async def test_pages_cover_every_document_exactly_once(store: Store) -> None:
    editors = [Editor(f"wo:{n}") for n in range(30)]
    last: dict[str, int] = {}
    for round_ in range(3):
        for editor in editors[round_ * 7 :]:
            last[editor.doc] = (await store.append(editor.type("x"))).seq
    for limit in (1, 4, 7, 100):
        seen, removed, upto = await read_all(store, ALL, 0, limit)
        assert seen == last
        assert not removed
        assert upto == await store.head()
    middle = sorted(last.values())[len(last) // 2]
    seen, _, _ = await read_all(store, ALL, middle, 4)
    assert seen == {doc: seq for doc, seq in last.items() if seq > middle}


async def test_a_page_never_splits_the_forms_of_one_scope_change(store: Store) -> None:
    await store.append(put(work_order(1, "u-tom")))
    for n in range(5):
        await store.append(put(form(n, wo=1)))
    moved = await store.append(put(work_order(1, "u-sue")))
    seen, _, _ = await read_all(store, assignee("u-sue"), 0, 2)
    assert seen == {doc: moved.seq for doc in ["wo:1", *(f"form:{n}" for n in range(5))]}


async def test_scopes_select_work_orders_and_their_forms(store: Store) -> None:
    for write in (
        put(work_order(1, "u-tom", "north-1", "north")),
        put(work_order(2, "u-sue", "north-1", "north")),
        put(work_order(3, "u-max", "south-1", "south")),
        put(form(1, wo=1)),
        put(form(2, wo=3)),
        put(form(9, wo=404)),  # its work order has not arrived: only ALL sees it
    ):
        await store.append(write)

    async def visible(kind: ScopeKind, value: str | None = None) -> set[str]:
        seen, _, _ = await read_all(store, ScopeFilter(kind, value), 0, 2)
        return set(seen)

    assert await visible(ScopeKind.ASSIGNEE, "u-tom") == {"wo:1", "form:1"}
    assert await visible(ScopeKind.TEAM, "north-1") == {"wo:1", "wo:2", "form:1"}
    assert await visible(ScopeKind.REGION, "south") == {"wo:3", "form:2"}
    assert await visible(ScopeKind.ASSIGNEE, "u-nobody") == set()
    assert await visible(ScopeKind.ALL) == {"wo:1", "wo:2", "wo:3", "form:1", "form:2", "form:9"}
    page = await store.changes(NONE, 0, 10)
    assert (page.docs, page.removed, page.upto) == ([], [], await store.head())


async def test_reassignment_moves_the_forms_to_the_new_scope(store: Store) -> None:
    created = await store.append(put(work_order(1, "u-tom")))
    assert created.scope_change == ScopeChange("wo:1", None, work_order(1, "u-tom"))
    for n in (1, 2):
        assert (await store.append(put(form(n, wo=1)))).scope_change is None
    await store.append(put(work_order(2, "u-tom")))
    unchanged = await store.append(Editor("wo:1").type("note", work_order(1, "u-tom")))
    assert unchanged.scope_change is None
    before = await store.head()

    moved = await store.append(put(work_order(1, "u-sue")))
    assert moved.scope_change == ScopeChange(
        "wo:1", work_order(1, "u-tom"), work_order(1, "u-sue"), ("form:1", "form:2")
    )
    # Sue has read everything up to `before`: the forms, untouched since, still reach her.
    seen, removed, _ = await read_all(store, assignee("u-sue"), before, 10)
    assert seen == {"wo:1": moved.seq, "form:1": moved.seq, "form:2": moved.seq}
    assert not removed
    seen, removed, _ = await read_all(store, assignee("u-tom"), before, 10)
    assert (seen, removed) == ({}, {"wo:1", "form:1", "form:2"})
    # Someone who starts reading after the move is told nothing left.
    seen, removed, _ = await read_all(store, assignee("u-tom"), moved.seq, 10)
    assert (seen, removed) == ({}, set())

    back = await store.append(put(work_order(1, "u-tom")))
    seen, removed, _ = await read_all(store, assignee("u-tom"), before, 10)
    assert (set(seen), removed) == ({"wo:1", "form:1", "form:2"}, set())
    assert seen["form:1"] == back.seq


def scope_of(index: DocIndex) -> DocIndex:
    """The scope columns of `index` (what the followed feed tells of a move)."""
    return DocIndex(index.doc, index.type, index.wo, index.assignee, index.team, index.region)


async def test_the_followed_feed_tells_each_commits_scope_change(store: Store) -> None:
    """What another node learns from the feed is what the committing node learned from each
    commit: every creation and move in seq order, with the scope before and after it (a work
    order moved twice in one range included), and every changed document's work order row."""
    start = await store.head()
    commits: list[Committed] = [await store.append(put(work_order(1, "u-tom")))]
    await store.append(put(form(1, wo=1)))
    await store.append(put(form(2, wo=1)))
    commits.append(await store.append(put(work_order(2, "u-sue"))))
    commits.append(await store.append(put(work_order(1, "u-sue"))))
    await store.append(Editor("wo:2").type("note", work_order(2, "u-sue")))
    commits.append(await store.append(put(work_order(1, "u-ann"))))
    await store.append(put(form(3, wo=2)))
    expected = []
    for committed in commits:
        assert committed.scope_change is not None
        change = committed.scope_change
        # A creation's forms are the ones that exist when it is read: wo:1's came after it.
        forms = ("form:1", "form:2") if change.doc == "wo:1" else ("form:3",)
        before = scope_of(change.before) if change.before else None
        after = scope_of(change.after)
        expected.append((committed.seq, ScopeChange(change.doc, before, after, forms)))

    since, moves, changed = start, [], set()
    for _ in range(20):
        page = await store.follow(since, 2)
        moves += page.scope_changes
        changed |= {index.doc for index in page.changed}
        assert all(index.type == "wo" for index in page.changed)
        since = page.upto
        if not page.more:
            break
    assert moves == expected
    assert changed == {"wo:1", "wo:2"}
    assert since == await store.head()
    assert (await store.follow(since, 10)).scope_changes == []


async def test_a_work_order_arriving_after_its_forms_takes_them_in(store: Store) -> None:
    await store.append(put(form(1, wo=1)))
    created = await store.append(put(work_order(1, "u-tom")))
    assert created.scope_change is not None
    assert created.scope_change.forms == ("form:1",)
    seen, _, _ = await read_all(store, assignee("u-tom"), 0, 10)
    assert seen == {"wo:1": created.seq, "form:1": created.seq}


async def test_readers_following_upto_never_miss_a_concurrent_commit(store: Store) -> None:
    editors = [Editor(f"wo:{n}") for n in range(40)]
    scopes = {"u-tom": assignee("u-tom"), None: ALL}
    last: dict[str, int] = {}
    writing = True

    async def write(k: int) -> None:
        for i in range(120):
            n = (k * 7 + i) % len(editors)
            index = work_order(n, "u-tom" if n % 2 else "u-sue")
            last[editors[n].doc] = (await store.append(editors[n].type(".", index))).seq

    async def follow(scope: ScopeFilter, limit: int) -> dict[str, int]:
        seen: dict[str, int] = {}
        since = 0
        while True:
            finishing = not writing
            page = await store.changes(scope, since, limit)
            for doc in page.docs:
                seen[doc.id] = max(seen.get(doc.id, 0), doc.seq)
            since = page.upto
            if finishing and not page.more:
                return seen

    readers = [
        asyncio.create_task(follow(scope, limit))
        for scope in scopes.values()
        for limit in (1, 2, 3, 5)
    ]
    await asyncio.gather(*(write(k) for k in range(8)))
    writing = False
    results = await asyncio.gather(*readers)
    in_scope = {doc: seq for doc, seq in last.items() if int(doc.split(":")[1]) % 2}
    assert results == [in_scope] * 4 + [last] * 4


# Compaction


async def test_compaction_keeps_the_state_and_bounds_the_log(make_backend: BackendFactory) -> None:
    backend = make_backend(compact_after_updates=10)
    await backend.open()
    store = backend.store
    editor = Editor("wo:1")
    for i in range(95):
        await store.append(editor.type(f"line {i}\n"))
        if i % 9 == 0:
            await store.append(editor.erase(3))
    # A later commit for another document waits behind any compaction already started.
    await store.append(put(work_order(2)))

    stored = await store.load("wo:1")
    assert stored is not None
    assert stored.snapshot is not None
    assert len(stored.updates) < 10
    assert same_state(rebuild(stored), editor.ydoc)
    assert (await store.stats())["updates"] < 10 + 1
    await backend.close()


async def test_compaction_by_size_keeps_a_pipelined_burst(make_backend: BackendFactory) -> None:
    backend = make_backend(compact_after_bytes=512)
    await backend.open()
    store = backend.store
    editor = Editor("wo:1")
    await asyncio.gather(*(store.append(editor.type("x" * 40)) for _ in range(50)))
    await store.append(put(work_order(2)))
    stored = await store.load("wo:1")
    assert stored is not None
    assert stored.snapshot is not None
    assert sum(map(len, stored.updates)) < 512
    assert same_state(rebuild(stored), editor.ydoc)
    await backend.close()


async def test_compaction_keeps_edits_waiting_for_a_missing_update(
    make_backend: BackendFactory,
) -> None:
    backend = make_backend(compact_after_updates=2)
    await backend.open()
    store = backend.store
    editor = Editor("wo:1")
    first, missing, third = (editor.type(text) for text in ("a", "b", "c"))
    await store.append(first)
    await store.append(third)  # depends on `missing`, which has not arrived
    await store.append(put(work_order(2)))
    assert (await store.stats())["snapshots"] == 1

    await store.append(missing)
    assert same_state(rebuild(await store.load("wo:1")), editor.ydoc)
    await backend.close()


# Random interleavings against a model


DOCS = ("wo:0", "wo:1", "wo:2", "form:0", "form:1", "form:2", "form:3")
FORM_OF = {"form:0": "wo:0", "form:1": "wo:0", "form:2": "wo:1", "form:3": "wo:9"}
PEOPLE = ("u-tom", "u-sue")

writes = st.tuples(st.just("write"), st.sampled_from(DOCS), st.sampled_from((None, *PEOPLE)))
reads = st.tuples(
    st.just("read"), st.sampled_from((None, *PEOPLE)), st.integers(0, 60), st.integers(1, 4)
)


class Model:
    """What the feed should say, computed the obvious way."""

    def __init__(self) -> None:
        self.head = 0
        self.feed: dict[str, int] = {}
        self.assignee: dict[str, str | None] = {}
        self.history: list[tuple[int, str, str | None]] = []

    def write(self, doc: str, person: str | None) -> DocIndex | None:
        self.head += 1
        self.feed[doc] = self.head
        if doc in FORM_OF:
            return form(int(doc[5:]), int(FORM_OF[doc][3:]))
        old = self.assignee.get(doc, "absent")
        new = old if person is None and old != "absent" else person
        if old != new:
            if old != "absent":
                self.history.append((self.head, doc, old))
            for f, wo in FORM_OF.items():
                if wo == doc and f in self.feed:
                    self.feed[f] = self.head
        self.assignee[doc] = new
        return None if person is None else work_order(int(doc[3:]), person)

    def scope_of(self, doc: str) -> str | None:
        return self.assignee.get(FORM_OF.get(doc, doc))

    def changes(self, person: str | None, since: int) -> tuple[dict[str, int], set[str]]:
        def visible(doc: str) -> bool:
            return person is None or self.scope_of(doc) == person

        docs = {d: s for d, s in self.feed.items() if s > since and visible(d)}
        gone = {
            wo for seq, wo, old in self.history if since < seq and old == person and not visible(wo)
        }
        forms = {f for f, wo in FORM_OF.items() if wo in gone and f in self.feed}
        return docs, gone | forms


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(st.one_of(writes, reads), max_size=40))
async def test_any_interleaving_of_writes_and_paged_reads_matches_the_model(
    make_backend: BackendFactory, ops: list[tuple[object, ...]]
) -> None:
    async with make_backend.fresh() as backend:
        store = backend.store
        model = Model()
        queued: list[asyncio.Future[Committed]] = []
        try:
            for op in ops:
                if op[0] == "write":
                    doc, person = cast(tuple[str, str | None], op[1:])
                    index = model.write(doc, person)
                    # Pipelined, so writes share batches; the model numbers them in call order.
                    queued.append(
                        cast(asyncio.Future[Committed], store.append(put_doc(doc, index)))
                    )
                    continue
                person, since_choice, limit = cast(tuple[str | None, int, int], op[1:])
                seqs = [c.seq for c in await asyncio.gather(*queued)]
                assert seqs == list(range(model.head - len(queued) + 1, model.head + 1))
                queued.clear()
                since = since_choice % (model.head + 1)
                scope = ALL if person is None else assignee(person)
                seen, removed, upto = await read_all(store, scope, since, limit)
                assert (seen, removed) == model.changes(person, since)
                assert upto == model.head
        finally:
            await asyncio.gather(*queued)


def put_doc(doc: str, index: DocIndex | None) -> Write:
    return Editor(doc).type("x", index)
