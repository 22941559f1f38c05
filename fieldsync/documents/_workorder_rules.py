"""The work order's domain rules: plain, deterministic functions of the merged state.

The CRDT merge decides what the bytes converge to; these decide what may stand. Every rule reads
the merged document only, never the state before an update, so a set of updates ends in the same
state in whichever order it arrives: what a rule needs of the past is in the document, as
append-only logs (`status_log`, `meter_readings`) whose merged order is the same on every replica.
A rule replays its log, marks the entries that may not stand `rejected` with the reason (nothing
a device wrote is deleted), and projects the result into `fields`. Corrections are written by
the server as its own origin and rules never run on them, so they cannot chase themselves; a
corrected document has nothing left to correct (idempotent).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pycrdt import Array, Doc, Map

from fieldsync.documents._paths import data
from fieldsync.records import FieldChange

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

# Whether a role may move the status from one value to another; from None: create a work order
# in that status.
MayMove = Callable[[str, str | None, str], bool]


@dataclass(frozen=True, slots=True)
class Violation:
    """What the author of an update is told, and a conflict record keeps."""

    rule: str
    detail: str


@dataclass(frozen=True, slots=True)
class Correction:
    """A change that restores a legal state, and the violations it answers (none: the server's
    own bookkeeping, such as clearing a mark that no longer applies, which nobody is told of)."""

    fix: Callable[[Doc[Any]], None]
    violations: tuple[Violation, ...] = ()


@dataclass(frozen=True, slots=True)
class Creator:
    """Who wrote the update being judged: the server records a creation's status in its name."""

    subject: str
    role: str


# What each rule reads: an update that changes none of it cannot change the rule's outcome.
# FORMS stands for the linked forms' answers, which completion needs.
FORMS = "forms"
STATUS_READS = ("status_log", "fields.status", "checklist", FORMS)
METER_READS = ("meter_readings", "fields.meter_reading")
TIME_READS = ("time_entries",)


def reads(touched: Collection[str] | None, paths: Iterable[str]) -> bool:
    """Whether changes at the `touched` paths (None: any) reach what `paths` name."""
    if touched is None:
        return True
    # Loops, not a generator: this runs several times per update (S1 profile: ~10 µs in all).
    for p in paths:
        for t in touched:
            # Most pairs differ at once: no strings built for them.
            if t[:1] == p[:1] and (t == p or t.startswith(p + ".") or p.startswith(t + ".")):
                return True
    return False


# Reads a root array as plain data (the room keeps what it parsed until the root changes).
Reader = Callable[[str], list[Any]]


def forms_needed(touched: Collection[str] | None, read: Reader) -> bool:
    """Whether judging the document may reach a completion, which needs the linked forms'
    verdicts (`check`'s `forms_blocking`): looked up first, only then."""
    return reads(touched, STATUS_READS) and any(
        isinstance(entry, dict) and entry.get("status") == "completed"
        for entry in read("status_log")
    )


def check(
    doc: Doc[Any],
    may_move: MayMove,
    forms_blocking: Mapping[str, list[str]],
    touched: Collection[str] | None = None,
    creator: Creator | None = None,
    read: Reader | None = None,
) -> list[Correction]:
    """The corrections the merged `doc` needs: given which role may make which status move, per
    linked form the reasons it blocks completion (looked up when `forms_needed` says so;
    otherwise no completion is judged and any mapping does), the paths the update changed
    (None: any), and, for a document being created, its creator (a status set without a log
    entry is logged as the creator's)."""
    if read is None:
        read = lambda root: data(doc.get(root, type=Array))  # noqa: E731
    found: list[Correction] = []
    if reads(touched, STATUS_READS):
        found += _status(doc, read, may_move, forms_blocking, touched, creator)
    if reads(touched, METER_READS):
        found += _meter(doc, read, touched)
    if reads(touched, TIME_READS):
        found += _time_entries(read)
    return found


# The logs the rules replay. A writer whose role does not write the whole document may only
# append to them, entries in its own name: a log that could be edited would be a history that
# could be rewritten.
LOGS = ("status_log", "meter_readings")
# Records that name their author (`by`): the logs, and time entries, whose overlap rule is per
# author. Such a writer appends its own only.
OWN_ENTRIES = (*LOGS, "time_entries")


def log_problems(
    changes: Iterable[FieldChange], subject: str, roles: Collection[str]
) -> list[tuple[str, str]]:
    """What `changes` (read on a scratch replica) do to the records of `OWN_ENTRIES` that a
    writer held to its own entries may not do: change or delete an entry, or append one in
    another's name or role, or one already marked rejected. Each problem with its root."""
    problems: list[tuple[str, str]] = []
    for change in changes:
        root = change.path.split(".", 1)[0]
        if root not in OWN_ENTRIES:
            continue
        if change.path != root:
            problems.append((root, f"{change.path}: entries are never changed"))
            continue
        for step in change.new if isinstance(change.new, list) else []:
            if "delete" in step:
                problems.append((root, f"{root}: entries are never deleted"))
            for entry in step.get("insert", ()):
                problem = _entry_problem(entry, subject, roles if root == "status_log" else None)
                if problem:
                    problems.append((root, f"{root}: {problem}"))
    return problems


def _entry_problem(entry: Any, subject: str, roles: Collection[str] | None) -> str | None:
    if not isinstance(entry, dict):
        return "an entry is not a map"
    if entry.get("by") != subject:
        return f"an entry names {entry.get('by')!r}, not you"
    if roles is not None and entry.get("role") not in roles:
        return f"an entry names the role {entry.get('role')!r}"
    if "rejected" in entry:
        return "only the server rejects an entry"
    return None


# --- status ---------------------------------------------------------------------------------


def _status(
    doc: Doc[Any],
    read: Reader,
    may_move: MayMove,
    forms_blocking: Mapping[str, list[str]],
    touched: Collection[str] | None,
    creator: Creator | None,
) -> list[Correction]:
    fields = doc.get("fields", type=Map)
    shown = fields.get("status")
    entries = read("status_log")
    if not entries:
        if creator is None or not isinstance(shown, str):
            return []
        entry = {"status": shown, "by": creator.subject, "role": creator.role}

        def log_creation(doc: Doc[Any]) -> None:
            doc.get("status_log", type=Array).append(Map(entry))

        # The creation's own entry, judged like any other once it is in the log.
        return [Correction(log_creation)]
    if not reads(touched, ("status_log", "fields.status")) and not any(
        isinstance(entry, dict) and entry.get("status") == "completed" for entry in entries
    ):
        return []  # only the checklist or the forms changed, and only completion reads them
    status, verdicts = replay(entries, may_move, lambda: _completion_problems(read, forms_blocking))
    return _project(
        doc,
        ("status_log", "status"),
        entries,
        verdicts,
        status,
        touched,
        Violation(
            "status_transition",
            f"a status change is an entry of status_log; the status stays {status}",
        ),
    )


def replay(
    entries: list[Any], may_move: MayMove, completion_problems: Callable[[], list[str]]
) -> tuple[str | None, list[tuple[str, str | None]]]:
    """The status the log leads to, and per entry the rule that rejects it with the reason
    (None: it stands). Each entry is judged against the status the entries before it led to."""
    status: str | None = None
    verdicts: list[tuple[str, str | None]] = []
    problems: list[str] | None = None
    for entry in entries:
        target = entry.get("status") if isinstance(entry, dict) else None
        role = str(entry.get("role")) if isinstance(entry, dict) else "?"
        rule, reason = "status_transition", None
        if target not in STATUSES:
            reason = f"{target!r} is not a status"
        elif status is None:
            if not may_move(role, None, target):
                reason = f"the {role} role may not create a work order as {target}"
        elif target == status:
            pass
        elif (status, target) not in EDGES or not may_move(role, status, target):
            if status == "cancelled":
                rule = "cancel_dominates"
                reason = (
                    "the work order was cancelled by a supervisor; the work done is kept and "
                    "the status stays cancelled"
                )
            else:
                reason = f"{status} → {target} is not allowed for the {role} role"
        elif target == "completed":
            if problems is None:
                problems = completion_problems()
            if problems:
                rule, reason = (
                    "completion_requirements",
                    "completion refused: " + "; ".join(problems),
                )
        if reason is None:
            status = target
        verdicts.append((rule, reason))
    return status, verdicts


def _completion_problems(read: Reader, forms_blocking: Mapping[str, list[str]]) -> list[str]:
    problems = []
    for item in read("checklist"):
        if isinstance(item, dict) and item.get("required") and not item.get("done"):
            problems.append(f"checklist item {item.get('label') or item.get('id')!r} is not done")
    for form_id, reasons in sorted(forms_blocking.items()):
        problems += [f"{form_id}: {reason}" for reason in reasons]
    return problems


# --- meter readings -------------------------------------------------------------------------


def _meter(doc: Doc[Any], read: Reader, touched: Collection[str] | None) -> list[Correction]:
    """In log order, a reading below the highest one accepted before it is rejected; the
    field shows the highest accepted reading."""
    readings = read("meter_readings")
    highest: float | None = None
    verdicts: list[tuple[str, str | None]] = []
    for entry in readings:
        value = entry.get("value") if isinstance(entry, dict) else None
        reason = None
        if not isinstance(value, int | float) or isinstance(value, bool):
            reason = f"{value!r} is not a number"
        elif highest is not None and value < highest:
            reason = f"meter reading {value:g} is below the one recorded before it, {highest:g}"
        else:
            highest = value
        verdicts.append(("meter_never_decreases", reason))
    return _project(
        doc,
        ("meter_readings", "meter_reading"),
        readings,
        verdicts,
        highest,
        touched,
        Violation(
            "meter_never_decreases",
            f"a meter reading is an entry of meter_readings; the reading stays {highest}",
        ),
    )


# --- time entries ---------------------------------------------------------------------------


def _time_entries(read: Reader) -> list[Correction]:
    """Entries of one technician may not overlap. In array order (the same on every replica), an
    entry overlapping one accepted before it is rejected."""
    entries = read("time_entries")
    # Per technician, the accepted spans sorted by start: they do not overlap one another, so
    # a new span can only clash with its neighbours (a log n check, not a scan).
    accepted: dict[str, list[tuple[float, float]]] = {}
    verdicts: list[tuple[str, str | None]] = []
    for entry in entries:
        span = _span(entry)
        reason = None
        if span is not None:
            by = str(entry.get("by"))
            spans = accepted.setdefault(by, [])
            at = bisect.bisect_left(spans, span)
            neighbours = spans[max(at - 1, 0) : at + 1]
            clash = next((s for s in neighbours if span[0] < s[1] and s[0] < span[1]), None)
            if clash is None:
                spans.insert(at, span)
            else:
                reason = f"overlaps {by}'s entry {clash[0]:g}-{clash[1]:g}"
        verdicts.append(("time_entries_overlap", reason))
    marks = _marks(entries, verdicts)
    if not marks:
        return []
    return [
        Correction(
            lambda doc: _mark(doc.get("time_entries", type=Array), marks),
            tuple(_told(verdicts, marks)),
        )
    ]


def _span(entry: Any) -> tuple[float, float] | None:
    if not isinstance(entry, dict):
        return None
    start, end = entry.get("start"), entry.get("end")
    if not isinstance(start, int | float) or not isinstance(end, int | float) or end <= start:
        return None
    return float(start), float(end)


# --- shared by the logs ---------------------------------------------------------------------


def _project(
    doc: Doc[Any],
    log_and_field: tuple[str, str],
    entries: list[Any],
    verdicts: list[tuple[str, str | None]],
    outcome: Any,
    touched: Collection[str] | None,
    written_directly: Violation,
) -> list[Correction]:
    """The correction that marks a log's entries with their verdicts and shows where the log
    leads (`outcome`, None: nowhere yet) in its field of `fields`; the author of a write to the
    field without a log entry is told `written_directly`."""
    log, field = log_and_field
    marks = _marks(entries, verdicts)
    told = _told(verdicts, marks)
    if outcome is not None and doc.get("fields", type=Map).get(field) != outcome:
        if not marks and touched is not None and not reads(touched, (log,)):
            told.append(written_directly)
    elif not marks:
        return []

    def fix(doc: Doc[Any]) -> None:
        _mark(doc.get(log, type=Array), marks)
        if outcome is not None and doc.get("fields", type=Map).get(field) != outcome:
            doc.get("fields", type=Map)[field] = outcome

    return [Correction(fix, tuple(told))]


def _marks(entries: list[Any], verdicts: list[tuple[str, str | None]]) -> dict[int, str | None]:
    """The `rejected` reasons that differ from what the entries carry, by index (entries that
    are not maps cannot carry one)."""
    return {
        index: reason
        for index, (entry, (_, reason)) in enumerate(zip(entries, verdicts, strict=True))
        if isinstance(entry, dict) and entry.get("rejected") != reason
    }


def _told(
    verdicts: list[tuple[str, str | None]], marks: Mapping[int, str | None]
) -> list[Violation]:
    """One violation per rule that rejects entries not rejected before, with their reasons."""
    reasons: dict[str, list[str]] = {}
    for index, reason in marks.items():
        if reason is not None:
            found = reasons.setdefault(verdicts[index][0], [])
            if reason not in found:
                found.append(reason)
    return [Violation(rule, "; ".join(found)) for rule, found in reasons.items()]


def _mark(log: Array[Any], marks: Mapping[int, str | None]) -> None:
    """Set or clear the `rejected` reason of the log entries at `marks`. An entry written as a
    plain JSON object cannot take a key: it becomes a shared map with the same content."""
    for index, reason in marks.items():
        entry = log[index]
        if not isinstance(entry, Map):
            content = {key: value for key, value in dict(entry).items() if key != "rejected"}
            del log[index]
            log.insert(index, Map(content if reason is None else {**content, "rejected": reason}))
        elif reason is None:
            del entry["rejected"]
        else:
            entry["rejected"] = reason
