"""Work orders and forms as pycrdt documents: ids, projections to the index and to JSON."""

from __future__ import annotations

from typing import Any

from pycrdt import Doc, Text

from fieldsync.documents import _form as form
from fieldsync.documents import _templates as form_templates
from fieldsync.documents import _workorder as work_order
from fieldsync.documents import _workorder_rules as work_order_rules
from fieldsync.documents._ids import MAX_DOC_ID, DocType, InvalidDocId, doc_type
from fieldsync.documents._paths import Watched, data, follow, watch
from fieldsync.documents._rule_set import NO_RULES, DomainRules, RuleSet
from fieldsync.documents._templates import TemplateError, Templates
from fieldsync.records import DocIndex


def index(doc_id: str, doc: Doc[Any]) -> DocIndex:
    """The fields of `doc` that scopes and screens filter on."""
    if doc_type(doc_id) is DocType.WORK_ORDER:
        return work_order.index(doc_id, doc)
    return form.index(doc_id, doc)


def index_root(kind: DocType) -> str:
    """The root `index` reads: a change elsewhere leaves the index as it was."""
    return work_order.INDEX_ROOT if kind is DocType.WORK_ORDER else form.INDEX_ROOT


def index_keys(kind: DocType) -> frozenset[str]:
    """The keys of `index_root` that `index` reads: a change of any other key leaves it as it
    was."""
    return _WORK_ORDER_INDEX_KEYS if kind is DocType.WORK_ORDER else form.INDEX_KEYS


_WORK_ORDER_INDEX_KEYS = frozenset(work_order.INDEX_FIELDS)


def frozen_roots(kind: DocType) -> frozenset[str]:
    """The roots a document of `kind` is given at creation and never changes after."""
    return work_order.FROZEN if kind is DocType.WORK_ORDER else form.FROZEN


def creation_problems(kind: DocType, doc: Doc[Any], templates: Templates) -> dict[str, str]:
    """Why `doc` may not come into existence as it is, by path (empty: it may); the one
    creation rule of every path a document is created by (v1, y-websocket, REST, adapters).
    A work order is created `new` or `assigned`; a form names a template version that is
    loaded (one that is not could never be valid, and would block its work order for good)."""
    if kind is DocType.WORK_ORDER:
        return work_order.creation_problems(doc)
    template = form_templates.form_template(doc, templates)
    if isinstance(template, str):
        return {"meta.template": template, "meta.version": template}
    return {}


def roots(kind: DocType) -> dict[str, Any]:
    """The roots of a document type and their pycrdt types."""
    return work_order.ROOTS if kind is DocType.WORK_ORDER else form.ROOTS


def to_json(doc_id: str, doc: Doc[Any]) -> dict[str, Any]:
    """The document's content as plain JSON-ready data."""
    content: dict[str, Any] = {}
    for name, kind in roots(doc_type(doc_id)).items():
        root = doc.get(name, type=kind)
        content[name] = str(root) if kind is Text else data(root)
    return content


__all__ = [
    "MAX_DOC_ID",
    "NO_RULES",
    "DocType",
    "DomainRules",
    "InvalidDocId",
    "RuleSet",
    "TemplateError",
    "Templates",
    "Watched",
    "creation_problems",
    "data",
    "doc_type",
    "follow",
    "form",
    "form_templates",
    "frozen_roots",
    "index",
    "index_keys",
    "index_root",
    "roots",
    "to_json",
    "watch",
    "work_order",
    "work_order_rules",
]
