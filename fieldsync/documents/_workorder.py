"""The work order document: its roots, its index projection, and the edits that must go together
(a status change and its log entry, a meter reading and its log entry)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pycrdt import Array, Doc, Map, Text

from fieldsync.documents._paths import data
from fieldsync.documents._workorder_rules import EDGES
from fieldsync.records import DocIndex

# The root the index is read from, and the keys of it that scopes and screens filter on
# (DESIGN.md §2).
INDEX_ROOT = "fields"
INDEX_FIELDS = (
    "assignee",
    "team",
    "region",
    "status",
    "number",
    "title",
    "priority",
    "due_at",
    "site",
    "asset_id",
)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def due_key(value: str | None) -> str | None:
    """`due_at` as the index keeps it, so that text order is time order: an ISO 8601 date stays
    a date (due by the end of that day); a date-time becomes UTC, `YYYY-MM-DDTHH:MM:SSZ` (one
    without an offset is taken as UTC). Anything else is kept as written."""
    if value is None or len(value) == 10:
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def index(doc_id: str, doc: Doc[Any]) -> DocIndex:
    fields = data(doc.get("fields", type=Map))  # one read, not one transaction per field
    values = {name: _text(fields.get(name)) for name in INDEX_FIELDS}
    values["due_at"] = due_key(values["due_at"])
    return DocIndex(doc=doc_id, type="wo", wo=doc_id, **values)


# The document's roots and their types (DESIGN.md §2). `status_log` and `meter_readings` are
# append-only logs: `fields.status` and `fields.meter_reading` are what the rules read off them
# (see _workorder_rules.py), so that the outcome does not depend on the order updates arrive in.
ROOTS: dict[str, type[Map[Any]] | type[Array[Any]] | type[Text]] = {
    "fields": Map,
    "checklist": Array,
    "time_entries": Array,
    "parts": Array,
    "notes": Text,
    "attachments": Map,
    "status_log": Array,
    "meter_readings": Array,
}


FROZEN: frozenset[str] = frozenset()  # roots written at creation only: none

# A new work order waits for its technician or has one; every later status is reached through
# the status machine, by the people who do the work. The one creation rule of every path
# (v1, y-websocket, REST, adapters: `creation_problems`).
CREATION_STATUSES = ("new", "assigned")


def creation_problems(doc: Doc[Any]) -> dict[str, str]:
    """Why `doc` may not come into existence as it is, by path (empty: it may): a status it is
    created in other than `CREATION_STATUSES` (the first entry of `status_log`, or without a
    log the status shown, which the rules then log). Later entries of the log are moves,
    judged by the status machine and the completion requirements like any other: a work
    order cannot be born past them."""
    wanted = " or ".join(CREATION_STATUSES)
    entries = data(doc.get("status_log", type=Array))
    if entries:
        first = entries[0].get("status") if isinstance(entries[0], dict) else entries[0]
        if first not in CREATION_STATUSES:
            return {"status_log": f"a work order is created {wanted}, not {first}"}
        return {}
    status = doc.get("fields", type=Map).get("status")
    if status is not None and status not in CREATION_STATUSES:
        return {"fields.status": f"a work order is created {wanted}, not {status}"}
    return {}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _path(start: str, goal: str) -> list[str]:
    """The statuses from `start` to `goal` along the status machine's shortest path, both
    included; just `goal` when there is none (the rules then judge it)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier and goal not in paths:
        reached = []
        for before, after in sorted(EDGES):
            if before in frontier and after not in paths:
                paths[after] = [*paths[before], after]
                reached.append(after)
        frontier = reached
    return paths.get(goal, [goal])


def set_status(doc: Doc[Any], status: str, *, by: str, role: str, at: str | None = None) -> None:
    """Move the work order to `status` as `by` acting in `role`: the log entry the rules judge,
    and the field the app shows meanwhile, in one transaction."""
    with doc.transaction():
        doc.get("status_log", type=Array).append(
            Map({"status": status, "by": by, "role": role, "at": at or _now()})
        )
        doc.get("fields", type=Map)["status"] = status


def reassign(doc: Doc[Any], **fields: str | None) -> None:
    """Set `assignee` (and `team`, `region` when given); a None assignee leaves it unassigned."""
    root = doc.get(INDEX_ROOT, type=Map)
    for key in ("assignee", "team", "region"):
        if key in fields and root.get(key) != fields[key]:
            if fields[key] is None:
                if key in root:
                    del root[key]
            else:
                root[key] = fields[key]


def record_meter_reading(doc: Doc[Any], value: float, *, by: str, at: str | None = None) -> None:
    """Record a meter reading of the work order's asset: the log entry the rules judge, and the
    field the app shows meanwhile, in one transaction."""
    with doc.transaction():
        doc.get("meter_readings", type=Array).append(
            Map({"value": value, "by": by, "at": at or _now()})
        )
        doc.get("fields", type=Map)["meter_reading"] = value


def write(
    doc: Doc[Any],
    fields: Mapping[str, Any],
    checklist: list[Mapping[str, Any]] = (),  # type: ignore[assignment]
    notes: str = "",
    *,
    by: str,
    role: str,
) -> None:
    """Fill a new work order in one transaction (seeding, adapters, tests), created by `by`
    acting in `role`: its status and meter reading are the first entries of their logs. A
    work order is created `new` or `assigned`; one seeded further on is logged as created so,
    then moved along the status machine's shortest path to its status (a completion among
    them is judged like any other)."""
    with doc.transaction():
        doc.get("fields", type=Map).update(dict(fields))
        status = fields.get("status")
        if isinstance(status, str):
            start = "assigned" if fields.get("assignee") else "new"
            for step in _path(start, status) if status not in CREATION_STATUSES else [status]:
                set_status(doc, step, by=by, role=role)
        reading = fields.get("meter_reading")
        if isinstance(reading, int | float) and not isinstance(reading, bool):
            record_meter_reading(doc, reading, by=by)
        items = doc.get("checklist", type=Array)
        for item in checklist:
            items.append(Map(dict(item)))
        if notes:
            doc.get("notes", type=Text).insert(0, notes)
