"""The work order document: its roots, its index projection, and its JSON projection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pycrdt import Array, Doc, Map, Text

from fieldsync.storage import DocIndex

# The `fields` keys that scopes and screens filter on (DESIGN.md §2).
INDEX_FIELDS = ("assignee", "team", "region", "status", "number", "title", "priority", "due_at")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def index(doc_id: str, doc: Doc) -> DocIndex:
    fields = doc.get("fields", type=Map)
    values = {name: _text(fields.get(name)) for name in INDEX_FIELDS}
    return DocIndex(doc=doc_id, type="wo", wo=doc_id, **values)


def to_json(doc: Doc) -> dict[str, Any]:
    return {
        "fields": doc.get("fields", type=Map).to_py() or {},
        "checklist": doc.get("checklist", type=Array).to_py() or [],
        "time_entries": doc.get("time_entries", type=Array).to_py() or [],
        "parts": doc.get("parts", type=Array).to_py() or [],
        "notes": str(doc.get("notes", type=Text)),
        "attachments": doc.get("attachments", type=Map).to_py() or {},
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
