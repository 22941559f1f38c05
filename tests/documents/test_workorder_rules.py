"""The work order rules as properties: offline replicas edit at random in the name of their
roles, a server merges their updates in every order and corrects after each merge the way the
replicator does (judging only what each update touched); every order ends in the same document,
which breaks no rule, and running the rules again changes nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map

from fieldsync import documents
from fieldsync.auth import Policy
from fieldsync.documents import work_order_rules as rules
from fieldsync.records import FieldChange

POLICY = Policy.load()
ROLES = {"tina": "technician", "sam": "supervisor"}


@dataclass(frozen=True)
class Edit:
    kind: str  # status, direct (the field without a log entry), meter, entry, check, uncheck
    value: int


edits = st.builds(
    Edit,
    kind=st.sampled_from(["status", "status", "direct", "meter", "entry", "check", "uncheck"]),
    value=st.integers(0, 50),
)
replicas = st.lists(
    st.tuples(st.sampled_from(["tina", "sam"]), st.lists(edits, min_size=1, max_size=4)),
    min_size=2,
    max_size=4,
)


def base() -> Doc[Any]:
    doc: Doc[Any] = Doc()
    documents.work_order.write(
        doc,
        {
            "status": "in_progress",
            "assignee": "tina",
            "team": "north",
            "region": "east",
            "meter_reading": 20,
        },
        [{"id": "c1", "label": "Seals", "required": True, "done": False}],
        by="sam",
        role="supervisor",
    )
    return doc


def edit(doc: Doc[Any], who: str, change: Edit) -> None:
    status = rules.STATUSES[change.value % len(rules.STATUSES)]
    if change.kind == "status":
        documents.work_order.set_status(doc, status, by=who, role=ROLES[who], at="t")
    elif change.kind == "direct":
        doc.get("fields", type=Map)["status"] = status
    elif change.kind == "meter":
        documents.work_order.record_meter_reading(doc, change.value, by=who, at="t")
    elif change.kind == "entry":
        start = change.value * 10
        doc.get("time_entries", type=Array).append(
            Map({"by": "tina", "start": start, "end": start + 25})
        )
    else:
        doc.get("checklist", type=Array)[0]["done"] = change.kind == "check"


def correct(server: Doc[Any], touched: frozenset[str] | None) -> list[rules.Correction]:
    corrections = rules.check(server, POLICY.may_move, {}, touched)
    with server.transaction(origin="server"):
        for correction in corrections:
            correction.fix(server)
    return corrections


def merge(seed: bytes, updates: list[bytes]) -> Doc[Any]:
    """The server: apply each update, then correct what it touched, as the replicator does."""
    server: Doc[Any] = Doc()
    server.apply_update(seed)
    changes: list[FieldChange] = []
    unwatch = documents.watch(server, documents.work_order.ROOTS, changes)
    for update in updates:
        server.apply_update(update)
        touched = frozenset(change.path for change in changes)
        correct(server, touched)
        changes.clear()  # the server's own corrections are not judged
    unwatch()
    return server


def content(doc: Doc[Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(
        orjson.dumps(documents.to_json("wo:x", doc), option=orjson.OPT_SORT_KEYS)
    )
    return loaded


@settings(max_examples=60, deadline=None)
@given(replicas)
def test_every_merge_order_ends_in_the_same_legal_state(plan: list[tuple[str, list[Edit]]]) -> None:
    seed = base().get_update()
    updates = []
    for who, changes in plan:
        replica: Doc[Any] = Doc()
        replica.apply_update(seed)
        state = replica.get_state()
        with replica.transaction():
            for change in changes:
                edit(replica, who, change)
        updates.append(replica.get_update(state))
    finals = []
    for order in itertools.permutations(updates):
        server = merge(seed, list(order))
        # Idempotent, and nothing left to correct whatever the rules are asked to look at.
        assert correct(server, None) == [], order
        finals.append(content(server))
    first = finals[0]
    # The whole document, marks and projections included, is the same in every order.
    assert all(final == first for final in finals)

    fields = first["fields"]
    log = first["status_log"]
    standing = [e["status"] for e in log if "rejected" not in e]
    assert fields["status"] == standing[-1]
    for before, after in itertools.pairwise(standing):
        assert before == after or (before, after) in rules.EDGES
    if fields["status"] == "completed":
        assert first["checklist"][0]["done"] is True
    # A supervisor's cancel dominates a technician's concurrent work: once cancelled, no
    # technician's entry moves the status on.
    sam_moves = {c.value % 8 for who, cs in plan if who == "sam" for c in cs if c.kind == "status"}
    if sam_moves == {rules.STATUSES.index("cancelled")}:
        assert fields["status"] == "cancelled"
    readings = [r["value"] for r in first["meter_readings"]]
    assert fields["meter_reading"] == max(readings)
    assert all(
        "rejected" in r or r["value"] >= max(readings[:n], default=r["value"])
        for n, r in enumerate(first["meter_readings"])
    )
    spans = [(e["start"], e["end"]) for e in first["time_entries"] if "rejected" not in e]
    assert all(not (a[0] < b[1] and b[0] < a[1]) for a, b in itertools.combinations(spans, 2))


def test_a_rejected_entry_says_why_and_stays_in_the_log() -> None:
    doc = base()
    documents.work_order.set_status(doc, "closed", by="tina", role="technician")
    (correction,) = rules.check(doc, POLICY.may_move, {})
    assert correction.violations == (
        rules.Violation(
            "status_transition", "in_progress → closed is not allowed for the technician role"
        ),
    )
    correction.fix(doc)
    assert doc.get("fields", type=Map)["status"] == "in_progress"
    # Created assigned, moved on to in_progress (see `documents.work_order.write`), then this.
    assert [e.get("rejected") for e in doc.get("status_log", type=Array).to_py()] == [
        None,
        None,
        None,
        "in_progress → closed is not allowed for the technician role",
    ]
    assert rules.check(doc, POLICY.may_move, {}) == []


def test_a_completion_waits_for_its_forms() -> None:
    doc = base()
    doc.get("checklist", type=Array)[0]["done"] = True
    documents.work_order.set_status(doc, "completed", by="tina", role="technician")

    def read(root: str) -> Any:
        return documents.data(doc.get(root, type=Array))

    # Looked up only when judging reaches a completion, and then before judging.
    assert rules.forms_needed(None, read)
    assert not rules.forms_needed(frozenset({"notes"}), read)
    assert not rules.forms_needed(None, lambda root: read(root)[:-1])
    blocking = {"form:f1": ["ppe_checked: required"]}
    (refused,) = rules.check(doc, POLICY.may_move, blocking)
    assert [v.rule for v in refused.violations] == ["completion_requirements"]
    assert "form:f1: ppe_checked: required" in refused.violations[0].detail
    refused.fix(doc)
    assert doc.get("fields", type=Map)["status"] == "in_progress"
    # The form is answered: the completion the log holds stands, its mark is cleared, no one
    # is told anything.
    (stands,) = rules.check(doc, POLICY.may_move, {}, frozenset({rules.FORMS}))
    assert stands.violations == ()
    stands.fix(doc)
    assert doc.get("fields", type=Map)["status"] == "completed"
    assert rules.check(doc, POLICY.may_move, {}) == []


def test_a_creation_without_a_log_is_logged_in_its_creators_name() -> None:
    doc: Doc[Any] = Doc()
    doc.get("fields", type=Map).update({"status": "assigned", "assignee": "tina"})
    creator = rules.Creator("sam", "supervisor")
    (logged,) = rules.check(doc, POLICY.may_move, {}, None, creator)
    logged.fix(doc)
    assert doc.get("status_log", type=Array).to_py() == [
        {"status": "assigned", "by": "sam", "role": "supervisor"}
    ]
    assert rules.check(doc, POLICY.may_move, {}) == []


def test_only_entries_in_the_writers_own_name_are_appended() -> None:
    seed = base().get_update()

    def problems(change: Callable[[Doc[Any]], object]) -> list[str]:
        """What the write path's own reading of `change`, made by tina, finds wrong."""
        replica: Doc[Any] = Doc()
        replica.apply_update(seed)
        before = replica.get_state()
        change(replica)
        scratch = documents.Watched.replica(seed, documents.work_order.ROOTS)
        written = scratch.written(replica.get_update(before))
        return [problem for _, problem in rules.log_problems(written, "tina", {"technician"})]

    tina = documents.work_order
    assert problems(lambda d: tina.set_status(d, "on_hold", by="tina", role="technician")) == []
    assert problems(lambda d: tina.record_meter_reading(d, 30, by="tina")) == []
    assert problems(lambda d: tina.set_status(d, "closed", by="tina", role="supervisor")) == [
        "status_log: an entry names the role 'supervisor'"
    ]
    assert problems(lambda d: tina.record_meter_reading(d, 30, by="sam")) == [
        "meter_readings: an entry names 'sam', not you"
    ]
    assert problems(lambda d: d.get("status_log", type=Array)[0].__setitem__("by", "x")) == [
        "status_log.0.by: entries are never changed"
    ]
    # Time entries name their author too (the overlap rule is per author): a technician logs
    # its own time, never another's, and never rewrites an entry.
    assert problems(lambda d: d.get("time_entries", type=Array).append(entry("tina"))) == []
    assert problems(lambda d: d.get("time_entries", type=Array).append(entry("tom"))) == [
        "time_entries: an entry names 'tom', not you"
    ]


def entry(by: str) -> Map[Any]:
    return Map({"by": by, "start": 100, "end": 200})


@pytest.mark.parametrize(
    ("fields", "log", "problems"),
    [
        ({"status": "assigned"}, ["assigned"], {}),
        ({"status": "new"}, [], {}),
        ({}, [], {}),  # a stock Yjs app's: no status at all
        # Created, then moved on in the same update: moves the status machine judges.
        ({"status": "in_progress"}, ["assigned", "en_route", "in_progress"], {}),
        (
            {"status": "completed"},
            ["completed"],
            {"status_log": "a work order is created new or assigned, not completed"},
        ),
        (
            {"status": "completed"},
            [],
            {"fields.status": "a work order is created new or assigned, not completed"},
        ),
    ],
)
def test_a_work_order_is_created_new_or_assigned(
    fields: dict[str, str], log: list[str], problems: dict[str, str]
) -> None:
    doc: Doc[Any] = Doc()
    doc.get("fields", type=Map).update(fields)
    for status in log:
        doc.get("status_log", type=Array).append(Map({"status": status, "by": "sam"}))
    templates = documents.Templates.load()
    assert documents.creation_problems(documents.DocType.WORK_ORDER, doc, templates) == problems


def test_a_form_is_created_with_a_loaded_template() -> None:
    templates = documents.Templates.load()
    known: Doc[Any] = Doc()
    unknown: Doc[Any] = Doc()
    documents.form.write(known, "wo:1", "safety-check", 1, {})
    documents.form.write(unknown, "wo:1", "nope", 1, {})
    assert documents.creation_problems(documents.DocType.FORM, known, templates) == {}
    reason = "unknown template nope v1"
    assert documents.creation_problems(documents.DocType.FORM, unknown, templates) == {
        "meta.template": reason,
        "meta.version": reason,
    }


def test_a_withdrawn_form_blocks_no_completion() -> None:
    rule_set = documents.DomainRules(documents.Templates.load())
    form: Doc[Any] = Doc()
    documents.form.write(form, "wo:1", "safety-check", 1, {})
    assert rule_set.form_blocks(form)  # required answers missing
    documents.form.withdraw(form, by="sam", reason="started against the wrong work")
    assert documents.form.withdrawn(form)
    assert rule_set.form_blocks(form) == []
    assert documents.NO_RULES.form_blocks(Doc()) == []
