"""The work order rules as properties: offline replicas edit at random, a server merges their
updates in every order and corrects after each merge the way the replicator does; the result
breaks no rule, running the rules again changes nothing, and the outcome of the rules that do
not depend on arrival order is the same in every order."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map

from fieldsync import documents
from fieldsync.auth import Policy, Principal, Role
from fieldsync.documents import work_order_rules as rules

POLICY = Policy.load()
TECH = Principal("tina", frozenset({Role.TECHNICIAN}), team="north", region="east")
BOSS = Principal("sam", frozenset({Role.SUPERVISOR}), team="north", region="east")


@dataclass(frozen=True)
class Edit:
    kind: str  # status, cancel, entry, check
    value: int


edits = st.builds(
    Edit,
    kind=st.sampled_from(["status", "cancel", "entry", "entry", "check"]),
    value=st.integers(0, 50),
)
replicas = st.lists(
    st.tuples(st.sampled_from(["tech", "boss"]), st.lists(edits, min_size=1, max_size=4)),
    min_size=2,
    max_size=4,
)


def base() -> Doc:
    doc: Doc = Doc()
    documents.work_order.write(
        doc,
        {"status": "in_progress", "assignee": "tina", "team": "north", "region": "east"},
        [{"id": "c1", "label": "Seals", "required": True, "done": False}],
    )
    return doc


def edit(doc: Doc, who: str, change: Edit) -> None:
    fields = doc.get("fields", type=Map)
    with doc.transaction():
        if change.kind == "status":
            fields["status"] = rules.STATUSES[change.value % len(rules.STATUSES)]
        elif change.kind == "cancel" and who == "boss":
            fields.update({"status": "cancelled", "cancelled": True})
        elif change.kind == "entry":
            start = change.value * 10
            doc.get("time_entries", type=Array).append(
                Map({"by": "tina", "start": start, "end": start + 25})
            )
        elif change.kind == "check":
            doc.get("checklist", type=Array)[0]["done"] = True


def merge(seed: bytes, updates: list[tuple[str, bytes]]) -> Doc:
    """The server: apply each update, then correct as the replicator does."""
    server: Doc = Doc()
    server.apply_update(seed)
    for who, update in updates:
        principal = TECH if who == "tech" else BOSS
        was = rules.before(server)
        server.apply_update(update)
        violations = rules.check(
            was, server, lambda a, b, p=principal: POLICY.may_transition(p, a, b), {}
        )
        with server.transaction():
            for violation in violations:
                violation.fix(server)
    return server


def content(doc: Doc) -> dict:
    return orjson.loads(orjson.dumps(documents.to_json("wo:x", doc), option=orjson.OPT_SORT_KEYS))


@settings(max_examples=60, deadline=None)
@given(replicas)
def test_rules_leave_a_legal_state_in_every_merge_order(
    plan: list[tuple[str, list[Edit]]],
) -> None:
    seed = base().get_update()
    updates = []
    for who, changes in plan:
        replica: Doc = Doc()
        replica.apply_update(seed)
        state = replica.get_state()
        for change in changes:
            edit(replica, who, change)
        updates.append((who, replica.get_update(state)))
    cancelled = any(
        who == "boss" and any(c.kind == "cancel" for c in changes) for who, changes in plan
    )
    outcomes = []
    for order in itertools.permutations(updates):
        server = merge(seed, list(order))
        # Idempotent: the rules find nothing more to correct, for any author.
        for principal in (TECH, BOSS):
            again = rules.check(
                rules.before(server),
                server,
                lambda a, b, p=principal: POLICY.may_transition(p, a, b),
                {},
            )
            assert again == [], order
        final = content(server)
        entries = [(e["start"], e["end"]) for e in final["time_entries"] if "rejected" not in e]
        assert all(not (a[0] < b[1] and b[0] < a[1]) for a, b in itertools.combinations(entries, 2))
        assert final["fields"]["status"] in rules.STATUSES
        if cancelled:
            assert final["fields"]["status"] == "cancelled"  # a cancel dominates, in any order
        if final["fields"]["status"] == "completed":
            assert final["checklist"][0]["done"] is True
        outcomes.append((sorted(entries), cancelled and final["fields"]["status"]))
    # What does not depend on arrival order comes out the same in every order.
    assert all(outcome == outcomes[0] for outcome in outcomes)


def test_the_same_merge_gives_the_same_correction() -> None:
    doc = base()
    before = rules.before(doc)
    doc.get("fields", type=Map)["status"] = "closed"
    found = rules.check(before, doc, lambda a, b: POLICY.may_transition(TECH, a, b), {})
    again = rules.check(before, doc, lambda a, b: POLICY.may_transition(TECH, a, b), {})
    assert [(v.rule, v.detail) for v in found] == [(v.rule, v.detail) for v in again]
    assert [v.rule for v in found] == ["status_transition"]
