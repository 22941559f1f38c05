"""The contracts of what is written beside the updates in their group commit, every backend:
`FieldHistory`, `ConflictLog` and `Devices`."""

from __future__ import annotations

import time
from typing import Any

import pycrdt

from fieldsync.records import FieldChange, Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.storage import Conflict, DeviceSeen, Store, Write

NORTH = ScopeFilter(ScopeKind.TEAM, "north")


def write(doc: str, *changes: FieldChange, actor: str = "tina") -> Write:
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    ydoc.get("body", type=pycrdt.Text).insert(0, doc)
    return Write(doc, ydoc.get_update(), Origin(OriginKind.DEVICE, actor), actor, None, changes)


# --- FieldHistory -------------------------------------------------------------------------------


async def test_history_is_newest_first_with_who_and_which_commit(store: Store) -> None:
    first = await store.append(write("wo:1", FieldChange("fields.status", None, "assigned")))
    by_sam = write(
        "wo:1",
        FieldChange("fields.status", "assigned", "in_progress"),
        FieldChange("fields.title", "Pump", "Pump 4"),
        actor="sam",
    )
    second = await store.append(by_sam)
    await store.append(write("wo:2", FieldChange("fields.status", None, "assigned")))
    entries = await store.history("wo:1", None, None, 10)
    assert [(e.seq, e.actor, e.change.path) for e in entries] == [
        (second.seq, "sam", "fields.title"),
        (second.seq, "sam", "fields.status"),
        (first.seq, "tina", "fields.status"),
    ]
    assert entries[0].change == FieldChange("fields.title", "Pump", "Pump 4")
    assert entries[0].origin == by_sam.origin
    assert entries[0].at <= time.time()
    assert await store.history("wo:404", None, None, 10) == []


async def test_history_of_a_path_covers_what_lies_below_it_and_pages(store: Store) -> None:
    await store.append(
        write(
            "wo:1",
            FieldChange("checklist", None, []),
            FieldChange("checklist.0.done", None, False),
            FieldChange("checklist.1.done", None, False),
            FieldChange("checklists", None, "not below checklist"),
        )
    )
    await store.append(write("wo:1", FieldChange("checklist.0.done", False, True)))
    below = await store.history("wo:1", "checklist", None, 10)
    assert [e.change.path for e in below] == [
        "checklist.0.done",
        "checklist.1.done",
        "checklist.0.done",
        "checklist",
    ]
    assert [e.change.new for e in await store.history("wo:1", "checklist.0.done", None, 10)] == [
        True,
        False,
    ]
    # Pages chain by the last (seq, id) seen and never repeat or skip an entry.
    paged = []
    before: tuple[int, int] | None = None
    while page := await store.history("wo:1", "checklist", before, 2):
        paged += page
        before = (page[-1].seq, page[-1].id)
    assert paged == below


# --- ConflictLog --------------------------------------------------------------------------------


def conflict(doc: str, team: str, rule: str = "illegal_transition") -> Conflict:
    return Conflict(
        doc, rule, "reverted", "tina", Origin(OriginKind.DEVICE, "tina"), team, "east", "tina"
    )


async def test_conflicts_are_written_with_the_next_commit_and_listed_by_scope(
    store: Store,
) -> None:
    store.record_conflict(conflict("wo:1", "north"))
    store.record_conflict(conflict("wo:2", "south"))
    store.record_conflict(conflict("wo:3", "north", rule="completion_needs_checklist"))
    await store.append(write("wo:9"))
    listed = await store.conflicts(NORTH, None, 10)
    assert [(r.conflict.doc, r.conflict.rule) for r in listed] == [
        ("wo:3", "completion_needs_checklist"),
        ("wo:1", "illegal_transition"),
    ]
    assert listed[0].conflict == conflict("wo:3", "north", rule="completion_needs_checklist")
    assert len(await store.conflicts(ScopeFilter(ScopeKind.ALL), None, 10)) == 3
    assert await store.conflicts(ScopeFilter(ScopeKind.NONE), None, 10) == []
    older = await store.conflicts(NORTH, listed[0].id, 10)
    assert [r.conflict.doc for r in older] == ["wo:1"]


# --- Devices ------------------------------------------------------------------------------------


async def test_a_devices_last_contact_is_its_subjects(store: Store) -> None:
    assert await store.last_seen("d-1", "tina") is None
    before = time.time()
    store.touch_device(DeviceSeen("d-1", "tina", "android", "1.4.0", 0))
    await store.append(write("wo:1"))
    seen = await store.last_seen("d-1", "tina")
    assert seen is not None
    assert before <= seen <= time.time()
    # Another subject on the same device has not been seen there.
    assert await store.last_seen("d-1", "tom") is None


async def test_devices_are_listed_in_the_scope_their_user_had(store: Store) -> None:
    store.touch_device(DeviceSeen("d-1", "tina", "android", "1.4.0", 3, "north", "east"))
    store.touch_device(DeviceSeen("d-2", "ulla", "ios", "2.0.0", 5, "south", "west"))
    store.touch_device(DeviceSeen("d-3", "tom", "ios", "2.1.0", 0, "north", "east"))
    await store.append(write("wo:1"))
    north = await store.devices_in(NORTH, 10)
    assert {d.device_id for d in north} == {"d-1", "d-3"}
    tina = next(d for d in north if d.device_id == "d-1")
    assert (tina.subject, tina.platform, tina.version, tina.last_seq) == (
        "tina",
        "android",
        "1.4.0",
        3,
    )
    assert (tina.team, tina.region) == ("north", "east")
    assert tina.last_seen > 0
    assert len(await store.devices_in(ScopeFilter(ScopeKind.ALL), 10)) == 3
    assert len(await store.devices_in(ScopeFilter(ScopeKind.ALL), 2)) == 2
    west = await store.devices_in(ScopeFilter(ScopeKind.REGION, "west"), 10)
    assert [d.device_id for d in west] == ["d-2"]
    mine = await store.devices_in(ScopeFilter(ScopeKind.ASSIGNEE, "tom"), 10)
    assert [d.device_id for d in mine] == ["d-3"]
    assert await store.devices_in(ScopeFilter(ScopeKind.NONE), 10) == []
