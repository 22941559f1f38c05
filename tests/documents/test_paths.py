"""Reading what an update writes: the scratch replica's view of roots and paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.documents._paths import root_names, watch
from fieldsync.records import FieldChange


def test_root_names_are_the_roots_keys_lists() -> None:
    doc: Doc[Any] = Doc()
    assert root_names(doc) == set(doc.keys()) == set()
    doc.get("fields", type=Map)["status"] = "new"
    doc.get("notes", type=Text).insert(0, "hi")
    doc.get("legacy", type=Array).append(1)
    assert root_names(doc) == set(doc.keys()) == {"fields", "notes", "legacy"}


def test_a_root_outside_the_schema_is_named_new_or_old() -> None:
    seed: Doc[Any] = Doc()
    seed.get("fields", type=Map)["status"] = "new"
    scratch = documents.Watched.replica(seed.get_update(), documents.work_order.ROOTS)

    def written(change: object) -> set[str]:
        replica: Doc[Any] = Doc()
        replica.apply_update(scratch.doc.get_update())
        before = replica.get_state()
        change(replica)  # type: ignore[operator]
        return {c.path for c in scratch.written(replica.get_update(before))}

    assert written(lambda d: d.get("extra", type=Map).__setitem__("k", 1)) == {"extra"}
    # Once there, a write into it is named by the root too, beside the schema's own paths.
    assert written(
        lambda d: (
            d.get("extra", type=Map).__setitem__("k", 2),
            d.get("fields", type=Map).__setitem__("title", "t"),
        )
    ) == {"extra", "fields.title"}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["append", "insert", "delete", "set"]), st.integers(0, 20)),
        min_size=1,
        max_size=12,
    )
)
def test_a_parsed_array_follows_its_recorded_changes(ops: list[tuple[str, int]]) -> None:
    """What the room keeps of a log between changes, brought up to date from the changes alone,
    equals reading the array again."""
    doc: Doc[Any] = Doc()
    log = doc.get("status_log", type=Array)
    log.append(Map({"status": "new"}))
    changes: list[FieldChange] = []
    stop = documents.watch(doc, {"status_log": Array}, changes)
    copy = documents.data(log)
    for op, n in ops:
        with doc.transaction():
            if op == "append":
                log.append(Map({"status": f"s{n}"}))
            elif op == "insert":
                log.insert(n % (len(log) + 1), Map({"status": f"i{n}"}))
                log.append({"plain": n})
            elif op == "delete" and len(log):
                del log[n % len(log)]
            elif op == "set" and len(log) and isinstance(log[n % len(log)], Map):
                log[n % len(log)]["rejected"] = f"r{n}"
        for change in changes:
            if change.path == "status_log":
                documents.follow(copy, change.new)
            else:
                copy = documents.data(log)  # a key of an entry: the room reads it again
        changes.clear()
        assert copy == documents.data(log)
    stop()


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from([*documents.work_order.INDEX_FIELDS, "notes_count", "f3", "sla"]))
def test_the_index_changes_only_when_a_key_it_reads_does(key: str) -> None:
    """`index_keys` is what lets the room skip recomputing the index: a write to any other key
    of the index root must leave the index as it was."""
    doc: Doc[Any] = Doc()
    documents.work_order.write(
        doc,
        {"assignee": "tina", "team": "north", "region": "east", "status": "assigned"},
        [],
        by="sam",
        role="supervisor",
    )
    before = documents.index("wo:1", doc)
    doc.get(documents.index_root(documents.DocType.WORK_ORDER), type=Map)[key] = "2027-01-01"
    changed = documents.index("wo:1", doc) != before
    assert changed == (key in documents.index_keys(documents.DocType.WORK_ORDER))


def test_a_form_index_reads_only_its_work_order() -> None:
    doc: Doc[Any] = Doc()
    documents.form.write(doc, "wo:1", "inspection", 1, {})
    before = documents.index("form:1", doc)
    meta = doc.get(documents.index_root(documents.DocType.FORM), type=Map)
    meta["template"] = "other"
    assert documents.index("form:1", doc) == before
    meta["wo"] = "wo:2"
    assert documents.index("form:1", doc) != before
    assert documents.index_keys(documents.DocType.FORM) == {"wo"}


def _edits() -> list[Callable[[Doc[Any]], object]]:
    """Every kind of change the collector reads: keys of the root map (plain values, a nested
    map, a deletion), maps inside a root array, appends and deletions of arrays, text."""
    return [
        lambda d: d.get("fields", type=Map).__setitem__("title", "pump"),
        lambda d: d.get("fields", type=Map).__setitem__("site", Map({"id": "s1", "n": 2})),
        lambda d: d.get("fields", type=Map)["site"].__setitem__("n", 3),
        lambda d: d.get("fields", type=Map).pop("title"),
        lambda d: d.get("checklist", type=Array).append(Map({"id": "c1", "done": False})),
        lambda d: d.get("checklist", type=Array)[0].__setitem__("done", True),
        lambda d: d.get("time_entries", type=Array).extend([Map({"by": "tina", "start": 1}), 2]),
        lambda d: d.get("time_entries", type=Array).pop(1),
        lambda d: d.get("notes", type=Text).insert(0, "hello "),
        lambda d: d.get("notes", type=Text).__delitem__(slice(0, 2)),
        lambda d: d.get("attachments", type=Map).__setitem__("a1", {"name": "x.png"}),
        lambda d: documents.work_order.set_status(
            d, "en_route", by="tina", role="technician", at="2026-12-01T08:00:00Z"
        ),
    ]


def _unordered(changes: list[FieldChange]) -> list[bytes]:
    """The roots' observers fire, and a map's keys come, in yrs' order, which is not fixed."""
    return sorted(orjson.dumps(change, option=orjson.OPT_SORT_KEYS) for change in changes)


def test_the_lean_subscription_reads_what_pycrdts_observe_deep_does() -> None:
    """`watch` reads events through pycrdt's native subscription (its public `observe_deep`
    costs most of the scratch replica's read): both must record the same changes."""
    source: Doc[Any] = Doc()
    lean: Doc[Any] = Doc()
    public: Doc[Any] = Doc()
    seen_lean: list[FieldChange] = []
    seen_public: list[FieldChange] = []
    roots = documents.work_order.ROOTS
    stops = [watch(lean, roots, seen_lean), watch(public, roots, seen_public, lean=False)]
    for edit in _edits():
        before = source.get_state()
        with source.transaction():
            edit(source)
        update = source.get_update(before)
        lean.apply_update(update)
        public.apply_update(update)
        assert _unordered(seen_lean) == _unordered(seen_public) != [], edit
        seen_lean.clear()
        seen_public.clear()
    for stop in stops:
        stop()
    source.get("fields", type=Map)["after"] = 1
    lean.apply_update(source.get_update())
    assert seen_lean == []
