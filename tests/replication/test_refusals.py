"""A refused update leaves no trace: it is undone (the room's document rebuilt as it was), so what
the server holds in memory, what it stores and what it serves are the accepted updates alone,
whatever the order of accepted and refused writes from several writers."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from tests.harness import running_issuer, running_server, stored_doc
from tests.wire import Wire, connect, sam_and_tina

DOC = "wo:r"


@dataclass(frozen=True)
class Write:
    writer: str  # "tina" (a technician: notes and parts, not priority) or "sam" (everything)
    kinds: tuple[str, ...]  # what the one update changes: "note", "part", "priority"
    value: int


writes = st.builds(
    Write,
    writer=st.sampled_from(["tina", "tina", "sam"]),
    kinds=st.lists(st.sampled_from(["note", "part", "priority"]), min_size=1, max_size=3).map(
        tuple
    ),
    value=st.integers(0, 999),
)


def change(doc: Doc[Any], write: Write) -> bytes:
    before = doc.get_state()
    with doc.transaction():
        for kind in write.kinds:
            if kind == "note":
                notes = doc.get("notes", type=Text)
                notes.insert(write.value % (len(notes) + 1), f"<{write.writer}{write.value}>")
            elif kind == "part":
                doc.get("parts", type=Array).append(Map({"sku": f"P-{write.value}", "qty": 1}))
            else:
                doc.get("fields", type=Map)["priority"] = f"{write.writer}-{write.value}"
    return doc.get_update(before)


async def answer(wire: Wire) -> dict[str, Any]:
    """The ack or the error of the update just sent (each update is answered before the next)."""
    taken: list[dict[str, Any]] = []

    def ready() -> bool:
        for i, body in enumerate(wire.controls):
            if body.get("type") in ("ack", "error") and body.get("doc") == DOC:
                taken.append(wire.controls.pop(i))
                return True
        return wire.closed

    async with asyncio.timeout(10), wire._arrived:
        await wire._arrived.wait_for(ready)
    assert taken, f"closed ({wire.close_code}) before an answer"
    return taken[0]


def fresh(state: bytes) -> Doc[Any]:
    """A replica at `state`, as a device that was reset rebuilds one (a new Yjs client id)."""
    doc: Doc[Any] = Doc()
    doc.apply_update(state)
    return doc


async def play(scenario: list[Write], data_dir: Path) -> int:
    """Play `scenario`, check the server against the accepted updates; returns how many were
    refused."""
    async with (
        running_issuer() as issuer,
        running_server(data_dir, issuer) as server,
        sam_and_tina(server, DOC, assignee="tina") as (sam, tina),
    ):
        start = (await tina.replica(DOC)).get_update()
        accepted = fresh(start)  # every update the server acknowledged, and nothing else
        replicas = {"tina": fresh(start), "sam": fresh(start)}
        wires = {"tina": tina, "sam": sam}
        refused = 0
        for write in scenario:
            update = change(replicas[write.writer], write)
            await wires[write.writer].update(DOC, update)
            reply = await answer(wires[write.writer])
            if reply["type"] == "ack":
                accepted.apply_update(update)
                # A technician's priority may be accepted only when it changed nothing: set
                # against a supervisor's concurrent one, and losing to it.
                assert not str(accepted.get("fields", type=Map).get("priority")).startswith("tina")
                continue
            assert write.writer == "tina", reply
            assert "priority" in write.kinds, reply
            assert reply["code"] == "forbidden_field"
            refused += 1
            # What the device does when reset: its copy again from what the server holds.
            replicas["tina"] = fresh((await tina.replica(DOC)).get_update())

        want = documents.to_json(DOC, accepted)
        assert documents.to_json(DOC, await stored_doc(server, DOC)) == want
        async with connect(server.sync_url, server.token("sam")) as late:
            await late.hello()
            assert documents.to_json(DOC, await late.replica(DOC)) == want
        return refused


@settings(
    max_examples=15,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(scenario=st.lists(writes, min_size=3, max_size=30))
def test_memory_storage_and_replicas_hold_the_accepted_updates_alone(
    scenario: list[Write],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(play(scenario, Path(tmp)))


def test_a_refusal_after_many_accepted_updates_is_undone_too() -> None:
    """Past the updates the room keeps to undo a refusal with (it takes the document's state
    again every 256), a refusal is undone as well."""
    scenario = [Write("tina", ("note",), n) for n in range(300)]
    scenario += [Write("tina", ("note", "priority"), 1), Write("sam", ("part",), 2)]
    with tempfile.TemporaryDirectory() as tmp:
        assert asyncio.run(play(scenario, Path(tmp))) == 1
