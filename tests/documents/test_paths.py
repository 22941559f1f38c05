"""Reading what an update writes: the scratch replica's view of roots and paths."""

from __future__ import annotations

from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.documents._paths import root_names


def test_root_names_are_the_roots_keys_lists() -> None:
    doc: Doc = Doc()
    assert root_names(doc) == set(doc.keys()) == set()
    doc.get("fields", type=Map)["status"] = "new"
    doc.get("notes", type=Text).insert(0, "hi")
    doc.get("legacy", type=Array).append(1)
    assert root_names(doc) == set(doc.keys()) == {"fields", "notes", "legacy"}


def test_a_root_outside_the_schema_is_named_new_or_old() -> None:
    seed: Doc = Doc()
    seed.get("fields", type=Map)["status"] = "new"
    scratch = documents.Scratch(seed.get_update(), documents.work_order.ROOTS)

    def written(change: object) -> set[str]:
        replica: Doc = Doc()
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
