"""Reading what an update writes: the scratch replica's view of roots and paths."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.documents._paths import root_names
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
    scratch = documents.Scratch(seed.get_update(), documents.work_order.ROOTS)

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
