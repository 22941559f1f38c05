"""The work order's domain rules: plain, deterministic functions of the merged state.

The CRDT merge decides what the bytes converge to; these decide what may stand. Each rule looks
at the state before a device's update and the merged state after it, and returns a `Violation`
with the correction that restores a legal state. Corrections are written by the server as its
own origin, and rules never run on the server's own updates, so they cannot chase themselves.
Running `check` on a corrected document finds nothing (idempotent).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc, Map

from fieldsync.documents._paths import data

# The status machine (issue 4): new → assigned → en_route → in_progress ⇄ on_hold → completed →
# closed; cancelled from any state before closed; a supervisor may reopen a completed work order
# (back to in_progress) or a cancelled one (back to assigned).
STATUSES = (
    "new",
    "assigned",
    "en_route",
    "in_progress",
    "on_hold",
    "completed",
    "closed",
    "cancelled",
)
EDGES: frozenset[tuple[str, str]] = frozenset(
    {
        ("new", "assigned"),
        ("assigned", "en_route"),
        ("en_route", "in_progress"),
        ("in_progress", "on_hold"),
        ("on_hold", "in_progress"),
        ("in_progress", "completed"),
        ("completed", "closed"),
        ("completed", "in_progress"),
        ("cancelled", "assigned"),
    }
    | {(status, "cancelled") for status in STATUSES if status not in ("closed", "cancelled")}
)

MayTransition = Callable[[str, str], bool]


@dataclass(frozen=True, slots=True)
class Before:
    """What the rules need of the state before an update."""

    status: str | None
    meter_reading: float | None


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    detail: str
    fix: Callable[[Doc], None] = field(compare=False)
    # False for the server's own bookkeeping (recording a cancel, clearing it on reopen): the
    # author did nothing wrong and hears nothing.
    notify: bool = True


def before(doc: Doc, status: str | None = None) -> Before:
    """The state the rules compare with, read before an update is applied; `status` when the
    caller knows it already (the room's index holds it)."""
    fields = doc.get("fields", type=Map)
    if status is None:
        current = fields.get("status")
        status = current if isinstance(current, str) else None
    meter = fields.get("meter_reading")
    return Before(
        status,
        float(meter) if isinstance(meter, int | float) and not isinstance(meter, bool) else None,
    )


# What each rule reads: an update that touches none of a rule's roots cannot break it.
_FIELD_RULES_READ = frozenset({"fields"})
_TIME_RULES_READ = frozenset({"time_entries"})


def check(
    was: Before,
    doc: Doc,
    may_transition: MayTransition,
    forms_blocking: Mapping[str, list[str]],
    touched: frozenset[str] | None = None,
) -> list[Violation]:
    """The violations of the merged `doc`, given the state before the update (`was`), whether
    the author's role may make a status transition, per linked form the reasons it blocks
    completion (missing required answers, invalid answers), and the roots the update touched
    (None: any)."""
    found: list[Violation] = []
    if touched is None or touched & _FIELD_RULES_READ:
        found += _field_rules(was, doc, may_transition, forms_blocking)
    if touched is None or touched & _TIME_RULES_READ:
        found += _time_entries(doc)
    return found


def _field_rules(
    was: Before,
    doc: Doc,
    may_transition: MayTransition,
    forms_blocking: Mapping[str, list[str]],
) -> list[Violation]:
    fields = doc.get("fields", type=Map)
    status = fields.get("status")
    found: list[Violation] = []
    changed = isinstance(status, str) and status != was.status
    legal = not changed or _legal(was.status, str(status), may_transition)
    if not legal:
        found.append(_revert(was.status, str(status)))
        status = was.status
    found += _cancel(status, fields.get("cancelled") is True)
    if any(v.rule == "cancel_dominates" for v in found):
        status = "cancelled"
    if changed and status == "completed" and was.status != "completed":
        found += _completion(doc, forms_blocking)
    found += _meter(was, fields.get("meter_reading"))
    return found


def _set(key: str, value: Any) -> Callable[[Doc], None]:
    def fix(doc: Doc) -> None:
        doc.get("fields", type=Map)[key] = value

    return fix


def _legal(previous: str | None, status: str, may_transition: MayTransition) -> bool:
    """Whether the role can reach `status` from `previous` in steps it may take: a device that
    was offline moved the work through several statuses, and only the last reaches us."""
    if previous is None:
        return True  # a new work order starts where its creator put it
    reached, frontier = {previous}, [previous]
    while frontier:
        here = frontier.pop()
        for start, end in EDGES:
            if start == here and end not in reached and may_transition(start, end):
                if end == status:
                    return True
                reached.add(end)
                frontier.append(end)
    return False


def _revert(previous: str | None, status: str) -> Violation:
    return Violation(
        "status_transition",
        f"{previous} → {status} is not allowed for your role; the status stays {previous}",
        _set("status", previous),
    )


def _cancel(status: Any, flagged: bool) -> list[Violation]:
    """A supervisor's cancel dominates concurrent work: cancelling writes `status: cancelled`
    and `cancelled: true`, a key technicians may not write, so whichever status the merge kept,
    the flag says the work order was cancelled, in every order updates arrive. Reopening is a
    deliberate act: a supervisor deletes the flag. The server records the flag when a cancel
    arrives without it."""
    if flagged and status != "cancelled":
        return [
            Violation(
                "cancel_dominates",
                "the work order was cancelled by a supervisor; the work done is kept and the "
                "status stays cancelled (to reopen it, a supervisor clears `cancelled`)",
                _set("status", "cancelled"),
            )
        ]
    if status == "cancelled" and not flagged:
        return [Violation("cancel_recorded", "cancel recorded", _set("cancelled", True), False)]
    return []


def _completion(doc: Doc, forms_blocking: Mapping[str, list[str]]) -> list[Violation]:
    reasons = []
    for item in data(doc.get("checklist", type=Array)):
        if isinstance(item, dict) and item.get("required") and not item.get("done"):
            reasons.append(f"checklist item {item.get('label') or item.get('id')!r} is not done")
    for form_id, problems in sorted(forms_blocking.items()):
        reasons += [f"{form_id}: {problem}" for problem in problems]
    if not reasons:
        return []
    detail = "completion refused: " + "; ".join(reasons)

    def fix(doc: Doc) -> None:
        fields = doc.get("fields", type=Map)
        fields["status"] = "in_progress"
        fields["status_reason"] = detail

    return [Violation("completion_requirements", detail, fix)]


def _meter(was: Before, reading: Any) -> list[Violation]:
    if was.meter_reading is None or not isinstance(reading, int | float):
        return []
    if isinstance(reading, bool) or reading >= was.meter_reading:
        return []
    return [
        Violation(
            "meter_never_decreases",
            f"meter reading {reading:g} is below the last one, {was.meter_reading:g}",
            _set("meter_reading", was.meter_reading),
        )
    ]


def _time_entries(doc: Doc) -> list[Violation]:
    """Entries of one technician may not overlap. In array order (the same on every replica), an
    entry overlapping one accepted before it is marked `rejected` with the reason, not deleted:
    the marks are a function of the merged array alone, so every merge order ends with the same
    marks, and nothing a technician logged is lost."""
    entries = data(doc.get("time_entries", type=Array))
    # Per technician, the accepted spans sorted by start: they do not overlap one another, so
    # a new span can only clash with its neighbours (a log n check, not a scan).
    accepted: dict[str, list[tuple[float, float]]] = {}
    marks: dict[int, str | None] = {}
    for index, entry in enumerate(entries):
        span = _span(entry)
        if span is None:
            continue
        by = str(entry.get("by"))
        spans = accepted.setdefault(by, [])
        at = bisect.bisect_left(spans, span)
        neighbours = spans[max(at - 1, 0) : at + 1]
        clash = next((s for s in neighbours if span[0] < s[1] and s[0] < span[1]), None)
        wanted = None if clash is None else f"overlaps {by}'s entry {clash[0]:g}-{clash[1]:g}"
        if clash is None:
            spans.insert(at, span)
        if entry.get("rejected") != wanted:
            marks[index] = wanted
    if not marks:
        return []

    def fix(doc: Doc) -> None:
        array = doc.get("time_entries", type=Array)
        for index, reason in marks.items():
            entry = array[index]
            if reason is None:
                del entry["rejected"]
            else:
                entry["rejected"] = reason

    added = sum(1 for reason in marks.values() if reason is not None)
    return [
        Violation(
            "time_entries_overlap",
            f"{added} time entr{'y' if added == 1 else 'ies'} overlapping another of the same "
            "technician marked rejected",
            fix,
            notify=added > 0,
        )
    ]


def _span(entry: Any) -> tuple[float, float] | None:
    if not isinstance(entry, dict):
        return None
    start, end = entry.get("start"), entry.get("end")
    if not isinstance(start, int | float) or not isinstance(end, int | float) or end <= start:
        return None
    return float(start), float(end)
