"""The form document: `meta` (template, version, work order), `answers` (field id -> value), the
server's `validation` of them, and `withdrawn`, the mark that takes it out of its work order's
completion."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pycrdt import Doc, Map

from fieldsync.records import DocIndex

INDEX_ROOT = "meta"  # the root the index is read from
INDEX_KEYS = frozenset({"wo"})  # the keys of it that `index` reads


def index(doc_id: str, doc: Doc[Any]) -> DocIndex:
    wo = doc.get(INDEX_ROOT, type=Map).get("wo")
    return DocIndex(doc=doc_id, type="form", wo=wo if isinstance(wo, str) else None)


ROOTS: dict[str, type[Map[Any]]] = {
    "meta": Map,
    "answers": Map,
    "validation": Map,
    "withdrawn": Map,
}
# Written at creation, never after: a form stays with its work order (whose scope it is seen
# in) and keeps the template version it was started with.
FROZEN = frozenset({"meta"})


def write(doc: Doc[Any], wo: str, template: str, version: int, answers: Mapping[str, Any]) -> None:
    """Fill a new form in one transaction (seeding, adapters, tests)."""
    with doc.transaction():
        doc.get("meta", type=Map).update({"wo": wo, "template": template, "version": version})
        doc.get("answers", type=Map).update(dict(answers))


def withdraw(doc: Doc[Any], *, by: str, reason: str, at: str | None = None) -> None:
    """Withdraw the form: it no longer counts for its work order's completion (a form filled
    against the wrong template, or no longer needed). Who may write `withdrawn` is the
    policy's (shipped: supervisors, managers, admins); clearing the map puts the form back."""
    at = at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc.get("withdrawn", type=Map).update({"by": by, "reason": reason, "at": at})


def withdrawn(doc: Doc[Any]) -> bool:
    """Whether the form is withdrawn: its `withdrawn` map holds anything."""
    return len(doc.get("withdrawn", type=Map)) > 0
