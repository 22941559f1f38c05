"""The authorisation matrix of issue 3, generated from the shipped policy and the document schemas.

Every principal of `tests.harness.USERS` (each role, two supervisors and three technicians of
different teams, and one principal with no role) against documents placed relative to it: a work
order assigned to it, one in its team, one in its region, one elsewhere, and a form of each. Over
everything that reads or writes a document: v1 SyncStep1, awareness, SyncStep2 and Update; a
y-websocket connect; the HTTP routes that name a document. Writes go to every path the schema
has: each root, each index key of a work order's `fields` (and the form's `meta.wo`), a key of a
checklist item, a root outside the schema the update brings and one the document already holds;
an entry appended in another's name to each record that names its author; a scope key of a work
order moved to a value outside every scope (v1 and y-websocket). Creation: a work order in each
scope and one in its creator's team but another region (v1 and REST), one born past its creation
status; a form for a work order in each scope and for one that does not exist, one with a
template that is not loaded.

What each cell expects is computed from `Policy.load()` (`scope` + `in_scope`, `forbidden_paths`,
`may_create`, `writes_everything`, `outside`), the schema and the documents' creation rule
(`documents.creation_problems`), never written down: a change to any changes the matrix. One
server runs the whole matrix once (one connection per principal, all principals at once), then
every cell is a test of its own, named role:subject-scope-doctype-message[-path], that checks
what the server did for it.

Who may call each HTTP route at all (public, signed in, operators) is
`tests/api/test_middleware.py`'s. The routes that name a document are driven here, per scope;
`test_every_route_about_a_document_is_in_the_matrix` fails when one appears that is not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.api._audit import AUDITORS
from fieldsync.app import REPLICATOR, STORE, create_app
from fieldsync.auth import DevUser, Policy, Principal, Role, in_scope
from fieldsync.config import Settings
from fieldsync.documents import DocType
from fieldsync.errors import CloseCode
from fieldsync.records import DocIndex
from fieldsync.replication import DocMessage, SyncStep, YAwareness, YSync, decode_y, encode_sync
from fieldsync.replication._awareness import decode_update, encode_update
from fieldsync.storage import Store
from tests.harness import USERS, Server, eventually, running_issuer, running_server, work_order
from tests.wire import Wire, connect

POLICY = Policy.load()
TEMPLATES = documents.Templates.load()

PRINCIPALS = {
    subject: Principal(
        subject, frozenset(Role(r) for r in user.roles), team=user.team, region=user.region
    )
    for subject, user in USERS.items()
}
ROLE = {subject: user.roles[0] if user.roles else "no-role" for subject, user in USERS.items()}

# Where a document lies relative to the principal it is tested against.
SCOPES = ("assigned", "team", "region", "elsewhere")
OUTSIDER = "zed"  # assigned to no principal of USERS
OTHER_TEAM, OTHER_REGION = "far-team", "far-region"
# A work order's scope keys, and the value a move writes to each: outside every scope.
MOVES = {key: f"moved-{key}" for key in ("assignee", "team", "region")}

# Paths outside the schema: a root the update brings, and one the document already holds (data
# an older app or an adapter left there).
NEW_ROOT = "x_unknown"
LEGACY_ROOT = "x_legacy"
NEW_KEY = "x_matrix"  # a key of a map root that is no index field
# The key `documents.form.index` reads: which work order (and so which scope) a form belongs to.
FORM_INDEX_KEYS = ("meta.wo",)

# What reads a document, per document type, and how.
HTTP_READS = {
    "http_get": "/v1/work-orders/{doc_id}",
    "http_screen": "/v1/screens/work-order/{doc_id}",
    "http_history": "/v1/work-orders/{doc_id}/history",
}
# Routes that, beside the scope, admit some roles only: a rule of the handler, not the policy.
HTTP_ROLES = {"http_history": AUDITORS}
READS = {
    DocType.WORK_ORDER: ("sync_step1", "awareness", "yws_connect", *HTTP_READS),
    DocType.FORM: ("sync_step1", "awareness", "yws_connect"),
}
WRITES = {"sync_step2": SyncStep.STEP2, "update": SyncStep.UPDATE}
# Writes of their own kind, as v1 updates: an entry in another's name ("as_other", to the
# records of `OWN_ENTRIES`), a scope key moved outside every scope ("move"; "yws_move" over
# y-websocket).
OWN_ENTRIES = documents.work_order_rules.OWN_ENTRIES
MOVE_WRITES = ("move", "yws_move")
CREATES = {
    DocType.WORK_ORDER: ("create", "http_create", "create_completed"),
    DocType.FORM: ("create", "create_unknown_template"),
}
V1_CREATES = ("create", "create_completed", "create_unknown_template")
# A work order in its creator's team (when it has one) but in another region.
ASTRAY = "astray"
# A dashboard's acts on a work order over REST, as the caller through the device write path:
# a reassignment (a move of `fields.assignee`, as "move" writes it) and a cancellation (an entry
# of `status_log`, judged by the status machine). Each on a work order of its own, run after the
# rest of the matrix so that its counts of what was stored and broadcast stay exact.
HTTP_ACTS = {
    "http_reassign": ("/v1/work-orders/{doc_id}/reassign", "fields.assignee"),
    "http_cancel": ("/v1/work-orders/{doc_id}/cancel", "status_log"),
}
# Routes that name a document, and the message of the matrix that drives each.
DOCUMENT_ROUTES = {
    ("GET", "/v1/yws/{doc_id}"): "yws_connect",
    **{("GET", path): message for message, path in HTTP_READS.items()},
    **{("POST", path): message for message, (path, _) in HTTP_ACTS.items()},
}
TIMEOUT = 10.0


def scope_fields(subject: str, scope: str) -> dict[str, str | None]:
    user = USERS[subject]
    assignee, team, region = {
        "assigned": (subject, user.team, user.region),
        "team": (OUTSIDER, user.team, user.region),
        "region": (OUTSIDER, OTHER_TEAM, user.region),
        "elsewhere": (OUTSIDER, OTHER_TEAM, OTHER_REGION),
        ASTRAY: (OUTSIDER, user.team, OTHER_REGION),
    }[scope]
    return {"assignee": assignee, "team": team, "region": region}


def doc_id(kind: DocType, subject: str, name: str) -> str:
    return f"{kind.value}:{subject}.{name}"


def build(kind: DocType, subject: str, scope: str, name: str | None = None) -> Doc[Any]:
    """The document of `kind` that lies in `scope` of `subject` (named `name`: one that
    `subject` tries to create; else one of the matrix, which holds a root outside the schema)."""
    doc: Doc[Any] = Doc()
    if kind is DocType.WORK_ORDER:
        documents.work_order.write(
            doc,
            {"number": f"{subject}.{name or scope}", "title": "Inspect pump", "status": "assigned"}
            | scope_fields(subject, scope),
            [{"id": "c1", "label": "Check seals", "required": True, "done": False}],
            # One the matrix holds is a supervisor's; one `subject` creates is its own.
            by=subject if name else "sam",
            role=ROLE[subject] if name else "supervisor",
        )
    else:
        wo = doc_id(DocType.WORK_ORDER, subject, scope)
        documents.form.write(doc, wo, "safety-check", 1, {"gloves": True})
    if name is None:
        doc.get(LEGACY_ROOT, type=Map)["v"] = 1
    return doc


def scope_index(subject: str, scope: str) -> DocIndex | None:
    """The scope index of the work order the documents of `subject`'s `scope` hang on (a form's
    is its work order's); None when there is no such work order."""
    if scope not in SCOPES:
        return None
    wo = doc_id(DocType.WORK_ORDER, subject, scope)
    return documents.index(wo, build(DocType.WORK_ORDER, subject, scope))


def write_paths(kind: DocType) -> list[str]:
    """Every path a write is tried on, from the schema."""
    roots = documents.roots(kind)
    paths = [f"{name}.{NEW_KEY}" if typ is Map else name for name, typ in roots.items()]
    if kind is DocType.WORK_ORDER:
        paths += [f"fields.{key}" for key in documents.work_order.INDEX_FIELDS]
        paths += [f"checklist.0.{key}" for key in ("done", "done_by", "label", "required")]
    else:
        paths += list(FORM_INDEX_KEYS)
    return [*paths, NEW_ROOT, LEGACY_ROOT]


def mutate(doc: Doc[Any], kind: DocType, path: str, n: int, by: str) -> None:
    """Write exactly `path` of `doc` as `by`. A key that is there is set again to its value: a
    real write (a new item) that moves no document out of anyone's scope and no status
    anywhere. A log gets an entry in the writer's own name that changes nothing: the status it
    has, a first reading."""
    root, _, key = path.partition(".")
    typ = documents.roots(kind).get(root, Map)
    if root in OWN_ENTRIES:
        append_entry(doc, root, n, by, ROLE[by])
    elif typ is Array and key:  # a key of an array's item: "checklist.0.done"
        at, _, item_key = key.partition(".")
        items = doc.get(root, type=Array)
        if len(items) <= int(at):
            items.append(Map({}))  # a document the writer may not read: refused anyway
        item = items[int(at)]
        item[item_key] = item.get(item_key, f"matrix-{n}")
    elif typ is Map:
        target = doc.get(root, type=Map)
        key = key or "v"
        target[key] = target.get(key, f"matrix-{n}")
    elif typ is Array:
        doc.get(root, type=Array).append(f"matrix-{n}")
    else:
        doc.get(root, type=Text).insert(0, f"matrix-{n} ")


def append_entry(doc: Doc[Any], root: str, n: int, by: str, role: str) -> None:
    """Append to a record of `OWN_ENTRIES` an entry in `by`'s name that changes nothing: the
    status the work order has, a first reading, time without a span."""
    if root == "status_log":
        status = doc.get("fields", type=Map).get("status")
        doc.get(root, type=Array).append(Map({"status": status, "by": by, "role": role}))
    elif root == "meter_readings":
        doc.get(root, type=Array).append(Map({"value": n, "by": by}))
    else:
        doc.get(root, type=Array).append(Map({"by": by, "minutes": n}))


def write_cell(doc: Doc[Any], cell: Cell, n: int) -> None:
    """Make on `doc` the write `cell` tries."""
    if cell.message == "as_other":
        append_entry(doc, cell.path, n, OUTSIDER, ROLE[cell.subject])
    elif cell.message in MOVE_WRITES:
        key = cell.path.split(".")[1]
        doc.get("fields", type=Map)[key] = f"{MOVES[key]}-{cell.message}"
    else:
        mutate(doc, cell.kind, cell.path, n, cell.subject)


# --- the cells ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cell:
    subject: str
    scope: str
    kind: DocType
    message: str
    path: str = ""

    @property
    def creates(self) -> bool:
        return self.message in CREATES[self.kind]

    @property
    def doc(self) -> str:
        if self.creates or self.message in HTTP_ACTS:
            return doc_id(self.kind, self.subject, f"{self.message}-{self.scope}")
        return doc_id(self.kind, self.subject, self.scope)

    @property
    def name(self) -> str:
        parts = [f"{ROLE[self.subject]}:{self.subject}", self.scope, self.kind.value, self.message]
        return "-".join([*parts, self.path] if self.path else parts)

    def new(self) -> Doc[Any]:
        """What a creation cell creates."""
        doc: Doc[Any] = Doc()
        if self.message == "create_completed":  # shown completed, as a stock Yjs app would
            fields = {"title": "Inspect pump", "status": "completed"}
            doc.get("fields", type=Map).update(fields | scope_fields(self.subject, self.scope))
            return doc
        if self.kind is DocType.WORK_ORDER or self.scope in SCOPES:
            doc = build(self.kind, self.subject, self.scope, self.doc)
        else:  # a form for a work order that does not exist
            wo = doc_id(DocType.WORK_ORDER, self.subject, self.scope)
            documents.form.write(doc, wo, "safety-check", 1, {"gloves": True})
        if self.message == "create_unknown_template":
            doc.get("meta", type=Map)["template"] = "not-loaded"
        return doc


@dataclass(frozen=True, slots=True)
class Expect:
    outcome: str  # "allowed", "forbidden" or "forbidden_field"
    paths: tuple[str, ...] = ()


# To a principal that may create such documents, what looks absent: an empty document, and a
# place where its presence waits (every Yjs provider announces itself on connecting).
LOOKS_ABSENT = ("sync_step1", "yws_connect", "awareness")
ALL_WRITES = (*WRITES, "as_other", *MOVE_WRITES)
EMPTY = {kind: documents.to_json(f"{kind.value}:x", Doc()) for kind in DocType}
EMPTY_STEP2 = b"\x00\x00"  # no structs, no deletions
EMPTY_STATE = b"\x00"


def carries_content(y: Any) -> bool:
    """Whether a y-protocols message holds anything of a document."""
    if not isinstance(y, YSync):
        return True  # awareness
    return y.payload not in (EMPTY_STEP2, EMPTY_STATE)


def expected(cell: Cell) -> Expect:
    principal = PRINCIPALS[cell.subject]
    if cell.creates:
        index = (
            documents.index(cell.doc, cell.new())
            if cell.kind is DocType.WORK_ORDER
            else scope_index(cell.subject, cell.scope)
        )
        if not POLICY.may_create(principal, cell.kind.value, index):
            return Expect("forbidden")
        problems = documents.creation_problems(cell.kind, cell.new(), TEMPLATES)
        return Expect("forbidden_field", tuple(sorted(problems))) if problems else Expect("allowed")
    if not in_scope(POLICY.scope(principal), scope_index(cell.subject, cell.scope)):
        # To a principal that may create such documents, one outside its scope looks absent.
        waits = POLICY.may_create_some(principal, cell.kind.value)
        return Expect("absent" if waits and cell.message in LOOKS_ABSENT else "forbidden")
    gate = HTTP_ROLES.get(cell.message)
    if gate is not None and not principal.roles & gate:
        return Expect("forbidden")
    if cell.message in READS[cell.kind]:
        return Expect("allowed")
    refused = POLICY.forbidden_paths(principal, cell.kind.value, [cell.path])
    if not refused and cell.path.split(".", 1)[0] in documents.frozen_roots(cell.kind):
        refused = [cell.path]  # written at creation only, whoever writes
    if (
        not refused
        and cell.message == "as_other"
        and not POLICY.writes_everything(principal, cell.kind.value)
    ):
        refused = [cell.path]  # held to its own entries
    if not refused and cell.message in (*MOVE_WRITES, "http_reassign"):
        key = cell.path.split(".")[1]
        seeded = scope_index(cell.subject, cell.scope)
        assert seeded is not None
        moved = dataclasses.replace(seeded, **{key: MOVES[key]})
        if POLICY.outside(principal, moved, [key]):
            refused = [cell.path]  # it would leave the writer's scope
    if refused:
        return Expect("forbidden_field", tuple(refused))
    if cell.message == "http_cancel":
        role = POLICY.acting_role(principal) or ""
        if not POLICY.may_move(role, "assigned", "cancelled"):
            return Expect("rule_violation")  # the status machine refuses it, as a device's
    return Expect("allowed")


def generate() -> list[Cell]:
    cells = []
    for subject in USERS:
        for kind in DocType:
            for scope in SCOPES:
                cells += [Cell(subject, scope, kind, message) for message in READS[kind]]
                cells += [
                    Cell(subject, scope, kind, message, path)
                    for path in write_paths(kind)
                    for message in WRITES
                ]
                if kind is DocType.WORK_ORDER:
                    cells += [Cell(subject, scope, kind, "as_other", r) for r in OWN_ENTRIES]
                    cells += [Cell(subject, scope, kind, m, p) for m, (_, p) in HTTP_ACTS.items()]
                    cells += [
                        Cell(subject, scope, kind, message, f"fields.{key}")
                        for message in MOVE_WRITES
                        for key in MOVES
                    ]
            creatable = (*SCOPES, ASTRAY) if kind is DocType.WORK_ORDER else (*SCOPES, "absent")
            cells += [Cell(subject, s, kind, m) for m in CREATES[kind] for s in creatable]
    return cells


CELLS = generate()


def cells(*messages: str) -> list[Any]:
    return [pytest.param(c, id=c.name) for c in CELLS if c.message in messages]


# --- running the matrix against a server -----------------------------------------------------


@dataclass
class Run:
    """What the server did, per cell, and what the whole run stored and broadcast."""

    seen: dict[Cell, dict[str, Any]] = field(default_factory=dict)
    doc_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (subject, doc) -> msgs
    probes: dict[tuple[str, str, str], str] = field(default_factory=dict)
    contents: dict[str, dict[str, Any]] = field(default_factory=dict)
    stored_rows: int = 0  # update rows the store gained during the matrix
    stored_acks: int = 0  # acks of writes and creations that stored something
    broadcasts: Counter[str] = field(default_factory=Counter)  # UPDATEs the observer received
    allowed_writes: Counter[str] = field(default_factory=Counter)
    # The server's own updates (domain rules, form validation) after a write: stored and
    # broadcast to every replica, the writer's included.
    corrections: Counter[str] = field(default_factory=Counter)
    yws_writes: Counter[str] = field(default_factory=Counter)  # allowed, per document
    logged_tokens: list[str] = field(default_factory=list)


def content(doc_id: str, update: bytes) -> dict[str, Any]:
    doc: Doc[Any] = Doc()
    doc.apply_update(update)
    return documents.to_json(doc_id, doc)


async def take(wire: Wire, doc: str, *kinds: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The first control message about `doc` of one of `kinds`. A domain rule's correction
    (`rule_violation`) is no answer to a write: the write was accepted."""
    control: dict[str, Any] = await wire._take(
        wire.controls,
        lambda body: (
            body.get("doc") == doc
            and body.get("type") in kinds
            and body.get("code") != "rule_violation"
        ),
        f"{'/'.join(kinds)} of {doc}",
        timeout,
    )
    return control


def answered(wire: Wire, doc: str) -> bool:
    """Whether `wire` holds an error about `doc` or a sync message of it."""
    return (
        wire.closed
        or any(c.get("type") == "error" and c.get("doc") == doc for c in wire.controls)
        or any(d == doc and isinstance(y, YSync) for d, y in wire.docs)
    )


async def refusal(wire: Wire, doc: str, reply: dict[str, Any]) -> dict[str, Any]:
    """What a refusal consists of: the error and the reset that must follow it."""
    if reply["type"] != "error":
        return {"reply": reply, "reset": None}
    try:
        reset = await take(wire, doc, "reset", timeout=2)
    except TimeoutError:
        reset = None
    return {"reply": reply, "reset": reset}


async def doc_seq(store: Store, doc: str) -> int:
    stored = await store.load(doc)
    return 0 if stored is None else stored.seq


async def corrections_of(wire: Wire, store: Store, doc: str) -> int:
    """How many updates the server made of its own to a document just created (once all it
    holds is committed, which the server's SyncStep1 waits for)."""
    await wire.step1(doc)
    await wire.doc_message(doc, SyncStep.STEP2)
    await wire.doc_message(doc, SyncStep.STEP1)
    stored = await store.load(doc)
    assert stored is not None
    assert stored.snapshot is None
    return len(stored.updates) - 1


def updates_of(wire: Wire) -> Counter[str]:
    """How many sync Update messages `wire` received, per document."""
    return Counter(d for d, y in wire.docs if isinstance(y, YSync) and y.step is SyncStep.UPDATE)


def awareness_of(wire: Wire, doc: str) -> set[int]:
    """The client ids whose (non-null) presence `wire` received for `doc`."""
    return {
        client
        for d, y in wire.docs
        if d == doc and isinstance(y, YAwareness)
        for client, _, state in decode_update(y.payload)
        if state != "null"
    }


async def http_get(http: aiohttp.ClientSession, url: str, token: str) -> dict[str, Any]:
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        return {"status": response.status, "body": await response.json(content_type=None)}


async def yws_connect(http: aiohttp.ClientSession, url: str, token: str) -> dict[str, Any]:
    """Open a y-websocket and sync once it greets. What came back: the document, or how it
    closed and how many messages came before."""
    received = 0
    async with http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as ws:
        while True:
            message = await ws.receive(timeout=TIMEOUT)
            if message.type is not aiohttp.WSMsgType.BINARY:
                close = (ws.close_code, str(message.extra or ""))
                return {"content": None, "close": close, "received": received}
            received += 1
            y = decode_y(message.data)
            if isinstance(y, YSync) and y.step is SyncStep.STEP1:
                await ws.send_bytes(encode_sync(SyncStep.STEP1, b"\x00"))
            elif isinstance(y, YSync) and y.step is SyncStep.STEP2:
                return {"content": content(url.rsplit("/", 1)[1], y.payload), "close": None}


async def yws_write(
    http: aiohttp.ClientSession, url: str, token: str, update: bytes
) -> dict[str, Any]:
    """Write `update` over a y-websocket of its own. What came back: how it closed, or None
    once the server answered the SyncStep1 sent after the write (so it took the write)."""
    async with http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as ws:
        sent = False
        while True:
            message = await ws.receive(timeout=TIMEOUT)
            if message.type is not aiohttp.WSMsgType.BINARY:
                return {"close": (ws.close_code, str(message.extra or ""))}
            if not sent:  # the greeting: the write, then a question it answers after the write
                await ws.send_bytes(encode_sync(SyncStep.UPDATE, update))
                await ws.send_bytes(encode_sync(SyncStep.STEP1, EMPTY_STATE))
                sent = True
            y = decode_y(message.data)
            if isinstance(y, YSync) and y.step is SyncStep.STEP2:
                return {"close": None}


async def run_principal(server: Server, observer: Wire, subject: str, run: Run) -> None:
    store = server.app[STORE]
    mine = [c for c in CELLS if c.subject == subject]
    cell = {(c.doc, c.message, c.path): c for c in mine}
    targets = {(c.kind, c.scope): c.doc for c in mine if c.message == "sync_step1"}
    token = server.token(subject)
    async with connect(server.sync_url, token) as wire, aiohttp.ClientSession() as http:
        await wire.hello()

        # v1 reads: every document at once, then what came back for each.
        await wire.send(
            *(DocMessage(d, encode_sync(SyncStep.STEP1, b"\x00")) for d in targets.values())
        )
        replicas: dict[str, Doc[Any]] = {}
        for doc in targets.values():
            await eventually(lambda doc=doc: answered(wire, doc))
            step2 = [y.payload for d, y in wire.docs if d == doc and isinstance(y, YSync)]
            seen: dict[str, Any] = {"reply": None, "reset": None, "content": None}
            if step2:
                seen["content"] = content(doc, step2[0])
                replicas[doc] = Doc()
                replicas[doc].apply_update(step2[0])
                # Taken, so that each later SyncStep1 is answered by its own reply.
                await wire.doc_message(doc, SyncStep.STEP2)
                await wire.doc_message(doc, SyncStep.STEP1)
            else:
                seen |= await refusal(wire, doc, await take(wire, doc, "error"))
            run.seen[cell[doc, "sync_step1", ""]] = seen

        # y-websocket, one socket per document; the HTTP routes that name one.
        for (kind, _), doc in targets.items():
            run.seen[cell[doc, "yws_connect", ""]] = await yws_connect(
                http, server.yws_url(doc), token
            )
            for message in set(READS[kind]) & set(HTTP_READS):
                url = server.url + HTTP_READS[message].format(doc_id=doc)
                run.seen[cell[doc, message, ""]] = await http_get(http, url, token)

        # Awareness: relayed to the observer (an admin's replica of every document) or refused.
        clients = {doc: 1000 + n for n, doc in enumerate(targets.values())}
        await wire.send(
            *(
                DocMessage(doc, encode_update([(client, 1, f'{{"user":"{subject}"}}')]))
                for doc, client in clients.items()
            )
        )
        # Presence on a document that looks absent is held, heard by nobody, and answers
        # nothing: a round trip after it shows the server has handled it.
        probe = f"wo:matrix-probe-{subject}"
        await wire.step1(probe)
        await eventually(lambda: answered(wire, probe))
        for doc, client in clients.items():
            if expected(cell[doc, "awareness", ""]).outcome == "absent":
                run.seen[cell[doc, "awareness", ""]] = {
                    "reply": next(
                        (
                            c
                            for c in wire.controls
                            if c.get("type") == "error" and c.get("doc") == doc
                        ),
                        None,
                    ),
                    "relayed": client in awareness_of(observer, doc),
                }
                continue
            await eventually(
                lambda doc=doc, client=client: (
                    wire.closed
                    or any(c.get("type") == "error" and c.get("doc") == doc for c in wire.controls)
                    or client in awareness_of(observer, doc)
                )
            )
            relayed = client in awareness_of(observer, doc)
            seen = {"reply": None, "reset": None, "client": client, "relayed": relayed}
            if any(c.get("type") == "error" and c.get("doc") == doc for c in wire.controls):
                seen |= await refusal(wire, doc, await take(wire, doc, "error"))
            run.seen[cell[doc, "awareness", ""]] = seen

        # Writes: each document on its own, each path in turn, made on the server's state (the
        # server may have corrected the last one: a readable document is synced again first).
        async def writes(doc: str) -> None:
            mirror = replicas.get(doc) or Doc()
            tried = [c for c in mine if c.doc == doc and c.message in ALL_WRITES]
            for n, c in enumerate(tried):
                if doc in replicas:
                    await wire.step1(doc, mirror.get_state())
                    mirror.apply_update(await wire.doc_message(doc, SyncStep.STEP2))
                    await wire.doc_message(doc, SyncStep.STEP1)  # all of it committed
                replica: Doc[Any] = Doc()
                replica.apply_update(mirror.get_update())
                before = replica.get_state()
                write_cell(replica, c, n)
                update = replica.get_update(before)
                stored_before = await doc_seq(store, doc)
                if c.message == "yws_move":
                    seen = await yws_write(http, server.yws_url(doc), token, update)
                    accepted = seen["close"] is None
                    if accepted and doc in replicas:
                        # Committed once the server's SyncStep1 comes (it waits for that).
                        await wire.step1(doc, mirror.get_state())
                        await wire.doc_message(doc, SyncStep.STEP2)
                        await wire.doc_message(doc, SyncStep.STEP1)
                        mirror.apply_update(update)
                        # Broadcast to this principal's v1 replica too: not a correction.
                        run.yws_writes[doc] += 1
                else:
                    step = WRITES.get(c.message, SyncStep.UPDATE)
                    await wire.send(DocMessage(doc, encode_sync(step, update)))
                    seen = await refusal(wire, doc, await take(wire, doc, "ack", "error"))
                    accepted = seen["reply"]["type"] == "ack"
                    if accepted:
                        mirror.apply_update(update)
                stored_after = await doc_seq(store, doc)
                if accepted:
                    run.allowed_writes[doc] += 1
                    run.stored_acks += stored_after > stored_before
                seen["stored"] = (stored_before, stored_after)
                run.seen[c] = seen

        await asyncio.gather(*(writes(doc) for doc in targets.values()))

        # Creation: as a device does it (the whole document in its first update), and over REST.
        for c in (c for c in mine if c.message in V1_CREATES):
            await wire.update(c.doc, c.new().get_update())
            seen = await refusal(wire, c.doc, await take(wire, c.doc, "ack", "error"))
            seen["index"] = await store.index(c.doc)
            if seen["reply"]["type"] == "ack":
                run.stored_acks += 1
                run.corrections[c.doc] = await corrections_of(wire, store, c.doc)
            run.seen[c] = seen
        for c in (c for c in mine if c.message == "http_create"):
            fields = {k: v for k, v in scope_fields(subject, c.scope).items() if v is not None}
            body = {"id": c.doc, "fields": {"title": "Inspect pump", **fields}}
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(server.url + "/v1/work-orders", json=body, headers=headers) as r:
                seen = {"status": r.status, "body": await r.json(content_type=None)}
            seen["index"] = await store.index(c.doc)
            if seen["status"] == 201:
                run.stored_acks += 1
                run.corrections[c.doc] = await corrections_of(wire, store, c.doc)
            run.seen[c] = seen

        # Probes: a document outside the scope and one that does not exist, over each transport.
        for kind in DocType:
            for name in ("elsewhere", "absent"):
                probe = doc_id(kind, subject, name)
                await wire.step1(probe)
                await eventually(lambda probe=probe: answered(wire, probe))
                errors = [
                    c["code"]
                    for c in wire.controls
                    if c.get("doc") == probe and c.get("type") == "error"
                ]
                run.probes[subject, f"v1-{kind.value}", name] = (
                    f"error {errors[-1]}" if errors else "sync"
                )
                yws = await yws_connect(http, server.yws_url(probe), token)
                run.probes[subject, f"yws-{kind.value}", name] = (
                    f"closed {yws['close']}" if yws["close"] else "opened"
                )
                if kind is DocType.WORK_ORDER:
                    for message, path in HTTP_READS.items():
                        got = await http_get(http, server.url + path.format(doc_id=probe), token)
                        answer = str(got["body"]).replace(probe, "<doc>")
                        run.probes[subject, message, name] = f"{got['status']} {answer}"

        for doc in targets.values():
            run.doc_bytes[subject, doc] = sum(
                1 for d, y in wire.docs if d == doc and carries_content(y)
            )
            run.corrections[doc] = (
                sum(
                    1
                    for d, y in wire.docs
                    if d == doc and isinstance(y, YSync) and y.step is SyncStep.UPDATE
                )
                - run.yws_writes[doc]
            )


async def run_matrix(data_dir: Path) -> Run:
    run = Run()
    async with running_issuer() as issuer, running_server(data_dir, issuer) as server:
        store = server.app[STORE]
        seeded = {
            doc_id(kind, subject, scope): build(kind, subject, scope)
            for subject in USERS
            for kind in DocType  # a work order before its form
            for scope in SCOPES
        }
        async with connect(server.sync_url, server.token("ada")) as observer:
            await observer.hello()
            await observer.send(
                *(
                    DocMessage(d, encode_sync(SyncStep.UPDATE, x.get_update()))
                    for d, x in seeded.items()
                )
            )
            for d in seeded:
                await take(observer, d, "ack")
            await observer.send(
                *(DocMessage(d, encode_sync(SyncStep.STEP1, b"\x00")) for d in seeded)
            )
            # What the server holds (its own marks included, such as a form's validation).
            for d in seeded:
                run.contents[d] = content(d, await observer.doc_message(d, SyncStep.STEP2))
                await observer.doc_message(d, SyncStep.STEP1)  # all it holds is committed
            # The creator waits in the room until the commit admits it; the server's correction
            # of a new form (its validation) may admit it first and send the whole form along.
            rooms: dict[str, Any] = server.app[REPLICATOR]._rooms
            await eventually(lambda: not any(rooms[d].pending for d in seeded))
            some = next(iter(seeded))
            await observer.step1(some)  # a round trip: what was queued before has arrived
            await observer.doc_message(some, SyncStep.STEP2)
            await observer.doc_message(some, SyncStep.STEP1)
            rows = (await store.stats())["updates"]
            seeding = updates_of(observer)
            await asyncio.gather(*(run_principal(server, observer, s, run) for s in USERS))
            # An allowed write's broadcast was queued before its ack: one more round trip and
            # all of them have arrived.
            await observer.step1(some)
            await observer.doc_message(some, SyncStep.STEP2)
            run.stored_rows = (await store.stats())["updates"] - rows
            run.broadcasts = updates_of(observer) - seeding
            await run_acts(server, observer, run)
    return run


async def run_acts(server: Server, observer: Wire, run: Run) -> None:
    """Every principal's REST acts, each on a work order of its own in each scope."""
    acts = [c for c in CELLS if c.message in HTTP_ACTS]
    await observer.send(
        *(
            DocMessage(
                c.doc, encode_sync(SyncStep.UPDATE, build(c.kind, c.subject, c.scope).get_update())
            )
            for c in acts
        )
    )
    for c in acts:
        await take(observer, c.doc, "ack")
    async with aiohttp.ClientSession() as http:
        for c in acts:
            path, _ = HTTP_ACTS[c.message]
            body = {"assignee": MOVES["assignee"]} if c.message == "http_reassign" else {}
            headers = {"Authorization": f"Bearer {server.token(c.subject)}"}
            url = server.url + path.format(doc_id=c.doc)
            async with http.post(url, json=body, headers=headers) as answer:
                run.seen[c] = {"status": answer.status, "body": await answer.json()}


class _Tokens(logging.Handler):
    JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if self.JWT.search(line):
            self.found.append(line[:300])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The matrix, run once for the module. `tests/conftest.py`'s token watch is per test and
    does not see module fixtures: this one watches its own logs."""
    watch = _Tokens()
    logging.getLogger().addHandler(watch)
    try:
        result = asyncio.run(run_matrix(tmp_path_factory.mktemp("matrix")))
    finally:
        logging.getLogger().removeHandler(watch)
    result.logged_tokens = watch.found
    return result


# --- the checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("cell", cells("sync_step1", "awareness"))
def test_v1_read(run: Run, cell: Cell) -> None:
    seen = run.seen[cell]
    if expected(cell).outcome == "allowed":
        assert seen["reply"] is None, seen["reply"]
        if cell.message == "sync_step1":
            assert seen["content"] == run.contents[cell.doc]
        else:
            assert seen["relayed"]
        return
    if expected(cell).outcome == "absent":
        assert seen["reply"] is None
        if cell.message == "sync_step1":
            assert seen["content"] == EMPTY[cell.kind]
        else:
            assert not seen["relayed"]  # held: heard by nobody while it waits
        assert run.doc_bytes[cell.subject, cell.doc] == 0
        return
    assert seen["reply"] is not None
    assert seen["reply"]["code"] == "forbidden", seen["reply"]
    assert seen["reset"] is not None
    assert seen["reset"]["reason"] == "forbidden"
    # Not a byte of the document, then or after (writes and awareness included).
    assert seen.get("content") is None
    assert not seen.get("relayed")
    assert run.doc_bytes[cell.subject, cell.doc] == 0


@pytest.mark.parametrize("cell", cells("yws_connect"))
def test_yws_connect(run: Run, cell: Cell) -> None:
    seen = run.seen[cell]
    if expected(cell).outcome == "allowed":
        assert seen["close"] is None
        assert seen["content"] == run.contents[cell.doc]
    elif expected(cell).outcome == "absent":
        assert seen["close"] is None
        assert seen["content"] == EMPTY[cell.kind]
    else:
        assert seen["close"] == (CloseCode.FORBIDDEN, "forbidden")
        assert seen["received"] == 0  # not a message before the close


@pytest.mark.parametrize("cell", cells(*HTTP_READS))
def test_http_read(run: Run, cell: Cell) -> None:
    status, body = run.seen[cell]["status"], run.seen[cell]["body"]
    if expected(cell).outcome == "allowed":
        assert status == 200, body
        if cell.message == "http_history":
            assert isinstance(body["items"], list)
            return
        assert body["id"] == cell.doc
        assert body["fields"] == run.contents[cell.doc]["fields"]
        if cell.message == "http_get":
            assert {k: v for k, v in body.items() if k not in ("id", "seq")} == run.contents[
                cell.doc
            ]
    else:
        assert (status, body["code"]) == (403, "forbidden"), body
        assert set(body) == {"type", "title", "status", "code", "detail"}  # nothing of it


@pytest.mark.parametrize("cell", cells(*WRITES, "as_other", "move"))
def test_write(run: Run, cell: Cell) -> None:
    seen = run.seen[cell]
    expect = expected(cell)
    reply = seen["reply"]
    before, after = seen["stored"]
    if expect.outcome == "allowed":
        assert reply["type"] == "ack", reply
        assert before < reply["seq"] <= after  # after: the server's corrections, if any
        return
    assert (reply["type"], reply["code"]) == ("error", expect.outcome), reply
    if expect.outcome == "forbidden_field":
        assert tuple(reply["paths"]) == expect.paths
    assert seen["reset"] is not None
    assert seen["reset"]["reason"] == expect.outcome
    assert after == before  # nothing of it stored


@pytest.mark.parametrize("cell", cells("yws_move"))
def test_yws_write(run: Run, cell: Cell) -> None:
    """y-websocket has no error message: a refusal closes the socket, with the code as the
    reason (4403 for forbidden and forbidden_field, 4400 otherwise)."""
    seen = run.seen[cell]
    expect = expected(cell)
    before, after = seen["stored"]
    if expect.outcome == "allowed":
        assert seen["close"] is None
        assert after > before
        return
    refused = expect.outcome in ("forbidden", "forbidden_field")
    code = CloseCode.FORBIDDEN if refused else CloseCode.PROTOCOL_ERROR
    assert seen["close"] == (code, expect.outcome)
    assert after == before  # nothing of it stored


@pytest.mark.parametrize("cell", cells(*CREATES[DocType.WORK_ORDER], *CREATES[DocType.FORM]))
def test_create(run: Run, cell: Cell) -> None:
    seen = run.seen[cell]
    expect = expected(cell)
    allowed = expect.outcome == "allowed"
    if cell.message == "http_create":
        assert seen["status"] == (201 if allowed else 403), seen["body"]
        if not allowed:
            assert seen["body"]["code"] == "forbidden"
    elif allowed:
        assert seen["reply"]["type"] == "ack", seen["reply"]
    else:
        assert (seen["reply"]["type"], seen["reply"]["code"]) == ("error", expect.outcome)
        if expect.outcome == "forbidden_field":
            assert tuple(seen["reply"]["paths"]) == expect.paths
        assert seen["reset"] is not None
    if allowed:
        assert seen["index"] is not None
        assert seen["index"].doc == cell.doc
    else:
        assert seen["index"] is None  # nothing of it stored


@pytest.mark.parametrize("cell", cells(*HTTP_ACTS))
def test_http_act(run: Run, cell: Cell) -> None:
    status, body = run.seen[cell]["status"], run.seen[cell]["body"]
    expect = expected(cell)
    if expect.outcome == "allowed":
        assert status == 200, body
        if cell.message == "http_reassign":
            assert body["fields"]["assignee"] == MOVES["assignee"]
        else:
            assert body["fields"]["status"] == "cancelled"
    elif expect.outcome == "rule_violation":
        assert (status, body["code"], body["rule"]) == (409, "rule_violation", "status_transition")
    else:
        assert (status, body["code"]) == (403, expect.outcome), body
        if expect.outcome == "forbidden_field":
            assert tuple(body["paths"]) == expect.paths
        else:
            assert set(body) == {"type", "title", "status", "code", "detail"}  # nothing of it


def test_nothing_refused_was_stored_or_broadcast(run: Run) -> None:
    # One update row per write that added something and per server correction, none for the
    # refused ones, not even late.
    assert run.stored_rows == run.stored_acks + run.corrections.total()
    # Every allowed write (and correction) reached the other replica of its document, and
    # nothing else did.
    seeded = {doc for _, doc in run.doc_bytes}
    expected = run.allowed_writes + run.corrections
    assert {d: run.broadcasts[d] for d in seeded} == {d: expected[d] for d in seeded}
    assert set(run.broadcasts) <= seeded  # the observer replicates those only


def _probe_cases() -> Iterator[Any]:
    for subject, principal in PRINCIPALS.items():
        if in_scope(POLICY.scope(principal), scope_index(subject, "elsewhere")):
            continue  # it sees the document elsewhere: nothing to hide from it
        for kind in DocType:
            transports = [f"v1-{kind.value}", f"yws-{kind.value}"]
            if kind is DocType.WORK_ORDER:
                transports += list(HTTP_READS)
            for transport in transports:
                # A principal that may create this type sees both as an absent document it may
                # write into (v1: an empty SyncStep2; y-websocket: an open, empty socket); any
                # other is refused both.
                waits = not transport.startswith("http") and POLICY.may_create_some(
                    principal, kind.value
                )
                yield pytest.param(
                    subject, transport, waits, id=f"{ROLE[subject]}:{subject}-{transport}"
                )


@pytest.mark.parametrize(("subject", "transport", "waits"), list(_probe_cases()))
def test_outside_the_scope_reads_as_absent(
    run: Run, subject: str, transport: str, waits: bool
) -> None:
    """Issue 3: reads answer "forbidden" and "absent" alike, so ids cannot be probed."""
    elsewhere = run.probes[subject, transport, "elsewhere"]
    assert elsewhere == run.probes[subject, transport, "absent"]
    assert ("forbidden" in elsewhere) is not waits


def test_no_token_in_the_matrix_logs(run: Run) -> None:
    assert run.logged_tokens == []


def test_the_matrix_covers_every_role_root_and_index_field() -> None:
    # `service` is no token's (tests/replication/test_service_writer.py drives it).
    token_roles = {r.value for r in Role if r is not Role.SERVICE}
    assert {ROLE[s] for s in USERS} == token_roles | {"no-role"}
    for kind in DocType:
        written = {c.path for c in CELLS if c.kind is kind and c.message in WRITES}
        assert {p.split(".")[0] for p in written} >= set(documents.roots(kind))
    written = {c.path for c in CELLS if c.kind is DocType.WORK_ORDER}
    assert {f"fields.{k}" for k in documents.work_order.INDEX_FIELDS} <= written


def test_every_route_about_a_document_is_in_the_matrix(tmp_path: Path) -> None:
    """A new HTTP route that names a document must be driven here, per role and scope."""
    settings = Settings.load(environ={}, data_dir=str(tmp_path), oidc_issuer="http://127.0.0.1:1")
    app = create_app(settings)
    about_documents = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and "{doc" in route.resource.canonical
    }
    assert about_documents == set(DOCUMENT_ROUTES)
    assert set(DOCUMENT_ROUTES.values()) <= {c.message for c in CELLS}


def test_mutate_writes_exactly_the_path_it_names() -> None:
    """The matrix's premise, checked with the write path's own reading (`Watched.written`)."""
    for kind in DocType:
        for path in write_paths(kind):
            base = build(kind, "tina", "assigned")
            replica: Doc[Any] = Doc()
            replica.apply_update(base.get_update())
            before = replica.get_state()
            mutate(replica, kind, path, 0, "tina")
            scratch = documents.Watched.replica(base.get_update(), documents.roots(kind))
            written = scratch.written(replica.get_update(before))
            assert {change.path for change in written} == {path}, (kind, path)


# --- a document that comes into existence while a peer waits for it ---------------------------


@pytest.fixture
def users() -> Mapping[str, DevUser]:
    """The users of `tests.harness`, whom the matrix is about (this folder's conftest gives its
    token tests others)."""
    return USERS


@pytest.fixture
async def slow_commits(server: Server) -> AsyncIterator[asyncio.Event]:
    """Commits wait for the event: what is applied stays uncommitted until then."""
    store = server.app[STORE]
    original = store.append
    gate = asyncio.Event()

    async def append(write: Any) -> Any:
        await gate.wait()
        return await original(write)

    store.append = append  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.set()
        store.append = original  # type: ignore[method-assign]


async def created_not_committed(server: Server, wire: Wire, doc: str) -> None:
    await wire.update(doc, work_order(doc, assignee="tina").get_update())
    rooms: dict[str, Any] = server.app[REPLICATOR]._rooms
    await eventually(lambda: doc in rooms and rooms[doc].exists)


async def test_a_peer_waiting_for_a_document_gets_nothing_of_another_scopes_creation(
    server: Server, slow_commits: asyncio.Event
) -> None:
    """sue (team south) asks for wo:race before it exists and waits for it, as a supervisor
    may. sam creates it in team north; until that commit is done (and the waiting peers are
    settled), sue gets what she gets once it is: neither its content nor any write."""
    async with (
        connect(server.sync_url, server.token("sue")) as sue,
        connect(server.sync_url, server.token("sam")) as sam,
    ):
        await sue.hello()
        await sam.hello()
        await sue.step1("wo:race")
        empty = content("wo:race", await sue.doc_message("wo:race", SyncStep.STEP2))
        assert empty["fields"] == {}
        await created_not_committed(server, sam, "wo:race")

        blind: Doc[Any] = Doc()
        blind.get("fields", type=Map)["assignee"] = "ulla"
        await sue.update("wo:race", blind.get_update())
        reply = await take(sue, "wo:race", "ack", "error")
        assert (reply["type"], reply.get("code")) == ("error", "forbidden")
        await sue.step1("wo:race")  # asked again: still an empty document
        assert await sue.doc_message("wo:race", SyncStep.STEP2) == EMPTY_STEP2
        slow_commits.set()
        await sam.control("ack", doc="wo:race")
    # Nothing of the document reached her: empty syncs and empty state vectors only.
    assert not [y for d, y in sue.docs if d == "wo:race" and carries_content(y)]
    stored = await server.app[STORE].load("wo:race")
    assert stored is not None
    assert len(stored.updates) == 1
    assert content("wo:race", stored.updates[0])["fields"]["assignee"] == "tina"


async def test_a_waiting_y_websocket_gets_nothing_of_another_scopes_creation(
    server: Server, slow_commits: asyncio.Event
) -> None:
    headers = {"Authorization": f"Bearer {server.token('sue')}"}
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        aiohttp.ClientSession() as http,
        http.ws_connect(server.yws_url("wo:race2"), headers=headers) as sue,
    ):
        await sam.hello()
        greeting = decode_y((await sue.receive(timeout=TIMEOUT)).data)
        assert isinstance(greeting, YSync)
        assert greeting.step is SyncStep.STEP1
        await created_not_committed(server, sam, "wo:race2")
        await sue.send_bytes(encode_sync(SyncStep.STEP1, b"\x00"))
        message = await sue.receive(timeout=TIMEOUT)
        # An empty document, as for an id that does not exist.
        assert decode_y(message.data) == YSync(SyncStep.STEP2, EMPTY_STEP2)
        slow_commits.set()
        await sam.control("ack", doc="wo:race2")


async def test_the_creator_and_peers_in_scope_go_on_while_the_creation_commits(
    server: Server, slow_commits: asyncio.Event
) -> None:
    """The other side of the check: sam's second update to his new work order (a device back
    from offline sends both at once) and mia, who waited for it in her region, are not
    refused while the creation is in flight."""
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("mia")) as mia,
    ):
        await sam.hello()
        await mia.hello()
        await mia.step1("wo:race3")
        await mia.doc_message("wo:race3", SyncStep.STEP2)
        doc = work_order("wo:race3", assignee="tina")
        await sam.update("wo:race3", doc.get_update())
        before = doc.get_state()
        doc.get("notes", type=Text).insert(0, "parts ordered")
        await sam.update("wo:race3", doc.get_update(before))
        rooms: dict[str, Any] = server.app[REPLICATOR]._rooms
        await eventually(lambda: "wo:race3" in rooms and rooms["wo:race3"].in_flight == 2)
        await mia.step1("wo:race3")
        seen = content("wo:race3", await mia.doc_message("wo:race3", SyncStep.STEP2))
        assert seen["notes"] == "parts ordered"
        slow_commits.set()
        assert [(await sam.control("ack", doc="wo:race3"))["seq"] for _ in "12"] == [1, 2]
    assert not [c for c in mia.controls if c.get("type") in ("error", "reset")]


# --- an update that does not take effect at once cannot be checked ----------------------------


@pytest.mark.parametrize("edit", ["set", "delete"])
async def test_a_technician_write_waiting_for_the_supervisors_next_edit_is_refused(
    server: Server, edit: str
) -> None:
    """tina may not write `fields.assignee`. She reads sam's client id and clock from the
    document, and sends an edit anchored on sam's next struct, which does not exist yet: a value
    whose origin it is, or its deletion. Nothing of it takes effect when it arrives, so the field
    check sees nothing; it takes effect with sam's next edit, which nobody checks (a supervisor
    writes everything), on whatever field that edit touches: here sam's reassignment to tom."""
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
    ):
        await sam.hello()
        await tina.hello()
        theirs = work_order("wo:ahead", assignee="tina")
        await sam.update("wo:ahead", theirs.get_update())
        await sam.control("ack", doc="wo:ahead")
        await tina.step1("wo:ahead")
        state = await tina.doc_message("wo:ahead", SyncStep.STEP2)

        guess: Doc[Any] = Doc(client_id=theirs.client_id)  # sam's next struct, as tina predicts it
        guess.apply_update(state)
        guess.get("fields", type=Map)["priority"] = "guessed"
        forged: Doc[Any] = Doc()
        forged.apply_update(guess.get_update())
        if edit == "set":
            forged.get("fields", type=Map)["priority"] = "zed"  # its origin is sam's next struct
        else:
            del forged.get("fields", type=Map)["priority"]
        await tina.update("wo:ahead", forged.get_update(guess.get_state()))
        reply = await take(tina, "wo:ahead", "ack", "error")
        # Refused, as what it writes cannot be known: the device resyncs (fieldsync.client holds
        # its live edits until its resync went out, so an honest device never sends one).
        assert (reply["type"], reply["code"]) == ("error", "resync_required"), reply
        await tina.control("reset", doc="wo:ahead")

        before = theirs.get_state()
        theirs.get("fields", type=Map)["assignee"] = "tom"  # sam's next struct
        await sam.update("wo:ahead", theirs.get_update(before))
        await sam.control("ack", doc="wo:ahead")
    index = await server.app[STORE].index("wo:ahead")
    assert index is not None
    assert index.assignee == "tom"
