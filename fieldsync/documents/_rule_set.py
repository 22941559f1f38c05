"""The domain rules as the write path asks for them, after each merge (DESIGN.md §2): one seam,
so that what they cost can be measured by running the same path with `NO_RULES`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

from pycrdt import Doc, Map

from fieldsync.documents import _form as form
from fieldsync.documents import _templates as form_templates
from fieldsync.documents import _workorder_rules as rules
from fieldsync.documents._workorder_rules import Correction, Creator, MayMove, Reader


class RuleSet(Protocol):
    def forms_needed(self, touched: Collection[str] | None, read: Reader) -> bool:
        """Whether judging a work order needs its forms' verdicts (`form_blocks`)."""
        ...

    def work_order(
        self,
        doc: Doc[Any],
        may_move: MayMove,
        forms_blocking: Mapping[str, list[str]],
        *,
        touched: Collection[str] | None,
        creator: Creator | None,
        read: Reader,
    ) -> list[Correction]:
        """The corrections a merged work order needs (`work_order_rules.check`)."""
        ...

    def form(self, doc: Doc[Any]) -> list[Correction]:
        """The corrections a merged form needs: its `validation` marks."""
        ...

    def form_blocks(self, doc: Doc[Any]) -> list[str]:
        """Why a form keeps its work order from completion (empty: it does not)."""
        ...


class DomainRules:
    """The rules fieldsync enforces: the work order's (`work_order_rules`) and the forms'
    validation against their templates."""

    def __init__(self, templates: form_templates.Templates) -> None:
        self.templates = templates

    def forms_needed(self, touched: Collection[str] | None, read: Reader) -> bool:
        return rules.forms_needed(touched, read)

    def work_order(
        self,
        doc: Doc[Any],
        may_move: MayMove,
        forms_blocking: Mapping[str, list[str]],
        *,
        touched: Collection[str] | None,
        creator: Creator | None,
        read: Reader,
    ) -> list[Correction]:
        return rules.check(doc, may_move, forms_blocking, touched, creator, read)

    def form(self, doc: Doc[Any]) -> list[Correction]:
        changes = form_templates.validation_changes(doc, self.templates)
        if not changes:
            return []

        def mark(doc: Doc[Any]) -> None:
            validation = doc.get("validation", type=Map)
            validation.update(changes.to_set)
            for key in changes.to_delete:
                del validation[key]

        return [Correction(mark)]  # nobody is told: the marks are the app's to show

    def form_blocks(self, doc: Doc[Any]) -> list[str]:
        if form.withdrawn(doc):
            return []
        problems = form_templates.check_form(doc, self.templates)
        return [f"{key}: {reason}" for key, reason in problems.items()]


class NoRules:
    """No domain rule at all: only to measure what the rules cost (bench/write_path.py)."""

    def forms_needed(self, touched: Collection[str] | None, read: Reader) -> bool:
        return False

    def work_order(
        self,
        doc: Doc[Any],
        may_move: MayMove,
        forms_blocking: Mapping[str, list[str]],
        *,
        touched: Collection[str] | None,
        creator: Creator | None,
        read: Reader,
    ) -> list[Correction]:
        return []

    def form(self, doc: Doc[Any]) -> list[Correction]:
        return []

    def form_blocks(self, doc: Doc[Any]) -> list[str]:
        return []


NO_RULES = NoRules()
