"""Work orders and forms as pycrdt documents: ids, projections to the index and to JSON."""

from __future__ import annotations

from typing import Any

from pycrdt import Doc

from fieldsync.documents import _form as form
from fieldsync.documents import _workorder as work_order
from fieldsync.documents._ids import MAX_DOC_ID, DocType, InvalidDocId, doc_type
from fieldsync.storage import DocIndex


def index(doc_id: str, doc: Doc) -> DocIndex:
    """The fields of `doc` that scopes and screens filter on."""
    if doc_type(doc_id) is DocType.WORK_ORDER:
        return work_order.index(doc_id, doc)
    return form.index(doc_id, doc)


def to_json(doc_id: str, doc: Doc) -> dict[str, Any]:
    """The document's content as plain JSON-ready data."""
    if doc_type(doc_id) is DocType.WORK_ORDER:
        return work_order.to_json(doc)
    return form.to_json(doc)


__all__ = [
    "MAX_DOC_ID",
    "DocType",
    "InvalidDocId",
    "doc_type",
    "form",
    "index",
    "to_json",
    "work_order",
]
