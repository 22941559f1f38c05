"""The form document: `meta` (template, version, work order) and `answers` (field id -> value)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pycrdt import Doc, Map

from fieldsync.records import DocIndex

INDEX_ROOT = "meta"  # the root the index is read from


def index(doc_id: str, doc: Doc) -> DocIndex:
    wo = doc.get(INDEX_ROOT, type=Map).get("wo")
    return DocIndex(doc=doc_id, type="form", wo=wo if isinstance(wo, str) else None)


ROOTS: dict[str, type[Map]] = {"meta": Map, "answers": Map, "validation": Map}
# Written at creation, never after: a form stays with its work order (whose scope it is seen
# in) and keeps the template version it was started with.
FROZEN = frozenset({"meta"})


def write(doc: Doc, wo: str, template: str, version: int, answers: Mapping[str, Any]) -> None:
    """Fill a new form in one transaction (seeding, adapters, tests)."""
    with doc.transaction():
        doc.get("meta", type=Map).update({"wo": wo, "template": template, "version": version})
        doc.get("answers", type=Map).update(dict(answers))
