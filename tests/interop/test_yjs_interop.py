"""A stock Yjs client (Node, y-websocket) and a pycrdt device replicate one work order through
fieldsync: `/v1/yws/{doc_id}` for Yjs, `fieldsync.v1` for pycrdt (DESIGN.md §3); and stock Yjs
clients alone create one."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text

from fieldsync.app import STORE
from fieldsync.client import Client
from fieldsync.documents import work_order_rules
from fieldsync.errors import CloseCode, ErrorCode
from fieldsync.replication import decode_state_vector
from tests.harness import Server, stored_doc, work_order
from tests.interop.conftest import YjsPeer, YjsPeerFactory

pytestmark = pytest.mark.slow

DOC = "wo:interop-1"

WORDS = ("seal ", "valve ", "leak ", "ok ", "pump ", "gasket ", "replaced ", "north ")


# --- the two replicas, seen the same way ---------------------------------------------------


def _plain(value: Any) -> Any:
    """JavaScript has one number type: Yjs writes 2 as an integer and yrs reads it back as 2.0.
    Integral floats become ints so both sides print numbers alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def canonical(content: dict[str, Any]) -> str:
    """JSON with sorted keys: yrs does not keep the key order of nested maps, Yjs does."""
    return json.dumps(_plain(content), sort_keys=True, ensure_ascii=False)


def py_content(doc: Doc[Any]) -> dict[str, Any]:
    return {
        "fields": doc.get("fields", type=Map).to_py() or {},
        "checklist": doc.get("checklist", type=Array).to_py() or [],
        "notes": str(doc.get("notes", type=Text)),
    }


def py_state_vector(doc: Doc[Any]) -> dict[int, int]:
    return decode_state_vector(doc.get_state())


def js_state_vector(dump: dict[str, Any]) -> dict[int, int]:
    return {int(client): clock for client, clock in dump["sv"].items()}


async def converged(peer: YjsPeer, doc: Doc[Any], timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the Yjs replica has the same content and state vector as `doc`. Nothing
    announces "the other side has it all", so this asks the peer again after each answer."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                dump = await peer.dump()
                if canonical(dump["json"]) == canonical(py_content(doc)) and js_state_vector(
                    dump
                ) == py_state_vector(doc):
                    return dump
                await asyncio.sleep(0.01)
    except TimeoutError:
        dump = await peer.dump()
        raise AssertionError(
            f"no convergence:\nyjs:    {canonical(dump['json'])} {js_state_vector(dump)}\n"
            f"pycrdt: {canonical(py_content(doc))} {py_state_vector(doc)}"
        ) from None


# --- edits: the same operations on either side ---------------------------------------------


def random_ops(rng: random.Random, side: str, round_: int, count: int = 6) -> list[dict[str, Any]]:
    """Concurrent edits: both sides set the status (a real conflict), insert text at random
    places, and tick items nested in the array; the supervisor's device (py) also adds items,
    which a technician (js) may not."""
    kinds = ("set", "insert", "insert", "check") + (("push",) if side == "py" else ())
    ops: list[dict[str, Any]] = []
    for i in range(count):
        kind = rng.choice(kinds)
        if kind == "set":
            ops.append({"set": ["status", f"{side}-{round_}-{i}"]})
        elif kind == "insert":
            ops.append({"insert": [rng.random(), rng.choice(WORDS)]})
        elif kind == "push":
            ops.append({"push": {"id": f"{side}{round_}.{i}", "label": "Extra", "done": False}})
        else:
            ops.append({"check": [rng.random(), rng.random() < 0.5]})
    return ops


def _at(fraction: float, length: int) -> int:
    return min(length, int(fraction * (length + 1)))  # as `at` in yjs_peer.mjs


def apply_py(doc: Doc[Any], ops: list[dict[str, Any]]) -> None:
    fields = doc.get("fields", type=Map)
    checklist = doc.get("checklist", type=Array)
    notes = doc.get("notes", type=Text)
    for op in ops:
        with doc.transaction():
            if "set" in op:
                fields[op["set"][0]] = op["set"][1]
            elif "insert" in op:
                notes.insert(_at(op["insert"][0], len(notes)), op["insert"][1])
            elif "push" in op:
                checklist.append(Map(op["push"]))
            elif "check" in op and len(checklist):
                checklist[_at(op["check"][0], len(checklist) - 1)]["done"] = op["check"][1]


async def concurrent_round(
    rng: random.Random, round_: int, peer: YjsPeer, doc: Doc[Any], client: Client | None
) -> None:
    """Both sides edit at once, neither waiting for the other's edits to arrive (while one is
    offline, neither can)."""
    js_ops, py_ops = random_ops(rng, "js", round_), random_ops(rng, "py", round_)
    js_edit = asyncio.create_task(peer.edit(js_ops))
    apply_py(doc, py_ops)
    await js_edit
    if client is not None:
        await client.wait_acked(DOC)


# --- the tests -----------------------------------------------------------------------------


async def create_work_order(server: Server, tmp_path: Path) -> Client:
    """The supervisor creates the work order from a pycrdt device, assigned to tina."""
    sam = server.client("sam", path=tmp_path / "sam.db")
    await sam.start()
    sam.doc(DOC).apply_update(work_order(DOC, assignee="tina", team="north").get_update())
    await sam.wait_acked(DOC)
    return sam


async def test_yjs_and_pycrdt_converge_online_and_offline(
    server: Server, yjs_peer: YjsPeerFactory, tmp_path: Path
) -> None:
    rng = random.Random(20240611)
    sam = await create_work_order(server, tmp_path)
    doc = sam.doc(DOC)
    try:
        # 1. The assigned technician's Yjs client receives the work order as created.
        tina = await yjs_peer(DOC)
        assert (await tina.connect(server.token("tina")))["ok"]
        dump = await converged(tina, doc)
        assert dump["json"]["fields"]["assignee"] == "tina"
        assert [item["label"] for item in dump["json"]["checklist"]] == ["Check seals"]

        # 2. Concurrent edits, both online.
        for round_ in range(3):
            await concurrent_round(rng, round_, tina, doc, sam)
        await converged(tina, doc)

        # 3. The Yjs client goes offline and keeps editing; the device edits meanwhile.
        await tina.disconnect()
        for round_ in range(3, 6):
            await concurrent_round(rng, round_, tina, doc, sam)
        assert canonical((await tina.dump())["json"]) != canonical(py_content(doc))
        assert (await tina.connect(server.token("tina")))["ok"]
        await converged(tina, doc)

        # 4. Both offline at once, then both back.
        await tina.disconnect()
        await sam.go_offline()
        for round_ in range(6, 9):
            await concurrent_round(rng, round_, tina, doc, None)
        await sam.start()
        assert (await tina.connect(server.token("tina")))["ok"]
        await sam.wait_acked(DOC)
        dump = await converged(tina, doc)

        # Every kind of edit made it across, from both sides.
        # Random statuses are no legal transition: the server's rules put the status back,
        # and both sides converged on the correction.
        assert dump["json"]["fields"]["status"] in work_order_rules.STATUSES
        ids = {item["id"] for item in dump["json"]["checklist"]}
        assert any(i.startswith("py") for i in ids)
        assert len(dump["json"]["notes"]) > 0
        # Three writers: the seed document the work order was built in, Sam's device, Tina's Yjs.
        assert {dump["client"], doc.client_id} < js_state_vector(dump).keys()

        # And the server stored it all: a fresh device loads the same document.
        ada = server.client("ada", path=tmp_path / "ada.db")
        try:
            await ada.start()
            await ada.wait_synced(DOC)
            assert canonical(py_content(ada.doc(DOC))) == canonical(dump["json"])
            assert py_state_vector(ada.doc(DOC)) == js_state_vector(dump)
        finally:
            await ada.close()
    finally:
        await sam.close()


@pytest.mark.parametrize(
    ("subject", "ttl", "code", "reason"),
    [
        pytest.param("tom", None, CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN, id="same-team"),
        pytest.param("ulla", None, CloseCode.FORBIDDEN, ErrorCode.FORBIDDEN, id="other-team"),
        pytest.param("tina", -120, CloseCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED, id="expired"),
    ],
)
async def test_yjs_client_refused(
    server: Server,
    yjs_peer: YjsPeerFactory,
    tmp_path: Path,
    subject: str,
    ttl: int | None,
    code: int,
    reason: str,
) -> None:
    """A technician the work order is not assigned to, and the assignee with an expired token
    (past the verifier's 60 s leeway), are closed with the code and receive nothing."""
    sam = await create_work_order(server, tmp_path)
    try:
        peer = await yjs_peer(DOC)
        reply = await peer.connect(server.token(subject, ttl=ttl))
        assert (reply["ok"], reply["code"], reply["reason"]) == (False, code, reason)
        dump = await peer.dump()
        assert dump["json"] == {"fields": {}, "checklist": [], "notes": ""}
        assert dump["sv"] == {}
        # Refused for good: it gave up instead of reconnecting in a loop.
        assert [e["code"] for e in peer.events if e["event"] == "close"] == [code]
    finally:
        await sam.close()


async def test_awareness_reaches_other_yjs_clients_and_is_not_stored(
    server: Server, yjs_peer: YjsPeerFactory, tmp_path: Path
) -> None:
    sam = await create_work_order(server, tmp_path)
    try:
        # Late joiners are greeted with the current states (tests/replication/test_protocol.py);
        # here both are connected and see each change as it happens.
        tina, supervisor = await yjs_peer(DOC), await yjs_peer(DOC)
        assert (await tina.connect(server.token("tina")))["ok"]
        assert (await supervisor.connect(server.token("sam")))["ok"]
        store = server.app[STORE]
        before = await store.stats()

        def presence(state: dict[str, Any] | None) -> Any:
            """An awareness event on the supervisor's client: Tina's state is `state`."""
            return lambda e: (
                e["event"] == "awareness"
                and (state in e["states"].values() if state else not e["states"])
            )

        cursor = {"user": {"name": "Tina Tech"}, "cursor": {"field": "notes", "index": 0}}
        await tina.set_awareness(cursor)
        await supervisor.wait_event(presence(cursor))
        moved = {**cursor, "cursor": {"field": "notes", "index": 7}}
        await tina.set_awareness(moved)
        await supervisor.wait_event(presence(moved))
        # Going offline tells the others Tina left.
        mark = len(supervisor.events)
        await tina.disconnect()
        await supervisor.wait_event(presence(None), after=mark)

        assert await store.stats() == before  # presence is relayed, never written
    finally:
        await sam.close()


def state(content: dict[str, Any], state_vector: dict[int, int]) -> str:
    return f"{canonical(content)} {sorted(state_vector.items())}"


async def all_converged(server: Server, peers: list[YjsPeer], timeout: float = 15.0) -> Doc[Any]:
    """Wait until every Yjs replica holds what the server stored (content and state vector);
    returns the stored document. Asks again after each answer: nothing announces convergence."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                stored = await stored_doc(server, NEW)
                want = state(py_content(stored), py_state_vector(stored))
                dumps = [await peer.dump() for peer in peers]
                seen = [state(d["json"], js_state_vector(d)) for d in dumps]
                if all(replica == want for replica in seen):
                    return stored
                seen.insert(0, want)
                await asyncio.sleep(0.01)
    except TimeoutError:
        names = ["server", *(peer.name for peer in peers)]
        lines = (f"{name}: {state}" for name, state in zip(names, seen, strict=False))
        raise AssertionError("no convergence:\n" + "\n".join(lines)) from None


NEW = "wo:yjs-new-1"


async def test_stock_yjs_clients_create_a_work_order_together(
    server: Server, yjs_peer: YjsPeerFactory
) -> None:
    """A work order that does not exist yet, opened at once by three stock Yjs apps whose roles
    may create one (an admin, the team's supervisor, the region's manager). Each announces its
    presence on connecting, before the document exists; none is refused. The manager goes
    offline and edits; the admin creates the work order; the supervisor is handed it and edits
    along; the manager comes back. All three and the server's stored copy converge."""
    ada, sam, mia = [await yjs_peer(NEW) for _ in range(3)]
    for peer, subject in ((ada, "ada"), (sam, "sam"), (mia, "mia")):
        assert (await peer.connect(server.token(subject)))["ok"], subject
    await mia.disconnect()
    await mia.edit(
        [{"insert": [0.0, "Bring the spare seal kit. "]}, {"push": {"id": "m1", "label": "Photo"}}]
    )
    await ada.set_awareness({"user": {"name": "Ada Admin"}})
    await ada.edit(
        [
            {
                "fields": {
                    "number": "Y-1",
                    "title": "Pump P-7 leaking",
                    "status": "assigned",
                    "assignee": "tina",
                    "team": "north",
                    "region": "east",
                    "priority": "high",
                }
            },
            {"push": {"id": "c1", "label": "Check seals", "required": True, "done": False}},
        ]
    )
    # The supervisor, waiting in the room, is handed the work order once it is stored; both
    # then edit at once.
    await sam.wait_event(lambda e: e["event"] == "awareness" and e["states"])
    edits = [
        ada.edit([{"insert": [1.0, "Ada was here. "]}, {"set": ["site", "Plant 2"]}]),
        sam.edit([{"insert": [0.0, "Sam too. "]}, {"check": [0.0, True]}]),
    ]
    await asyncio.gather(*edits)
    assert (await mia.connect(server.token("mia")))["ok"]
    stored = await all_converged(server, [ada, sam, mia])

    content = py_content(stored)
    assert content["fields"]["title"] == "Pump P-7 leaking"
    assert content["fields"]["site"] == "Plant 2"
    assert content["fields"]["status"] == "assigned"
    # The creation, logged by the server in the creator's name (a stock app writes no log).
    log = stored.get("status_log", type=Array).to_py()
    assert [(e["status"], e["by"]) for e in log] == [("assigned", "ada")]
    assert {item["id"] for item in content["checklist"]} == {"c1", "m1"}
    for words in ("Bring the spare seal kit.", "Ada was here.", "Sam too."):
        assert words in content["notes"]
    for peer in (ada, sam, mia):
        assert [e for e in peer.events if e["event"] == "close"] == [], peer.name
