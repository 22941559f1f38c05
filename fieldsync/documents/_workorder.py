"""The work order document: its roots, its index projection, and its JSON projection."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pycrdt import Array, Doc, Map, Text

from fieldsync.documents._paths import data
from fieldsync.storage import DocIndex

# The `fields` keys that scopes and screens filter on (DESIGN.md §2).
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


def index(doc_id: str, doc: Doc) -> DocIndex:
    fields = data(doc.get("fields", type=Map))  # one read, not one transaction per field
    values = {name: _text(fields.get(name)) for name in INDEX_FIELDS}
    values["due_at"] = due_key(values["due_at"])
    return DocIndex(doc=doc_id, type="wo", wo=doc_id, **values)


# The document's roots and their types (DESIGN.md §2).
ROOTS: dict[str, type[Map] | type[Array] | type[Text]] = {
    "fields": Map,
    "checklist": Array,
    "time_entries": Array,
    "parts": Array,
    "notes": Text,
    "attachments": Map,
}


def write(
    doc: Doc,
    fields: Mapping[str, Any],
    checklist: list[Mapping[str, Any]] = (),  # type: ignore[assignment]
    notes: str = "",
) -> None:
    """Fill a new work order in one transaction (seeding, adapters, tests)."""
    with doc.transaction():
        doc.get("fields", type=Map).update(dict(fields))
        items = doc.get("checklist", type=Array)
        for item in checklist:
            items.append(Map(dict(item)))
        if notes:
            doc.get("notes", type=Text).insert(0, notes)
