"""Convergence: devices edit the same work orders at random, go offline and come back in random
orders; every replica and the server end with the same state."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.client import Client
from fieldsync.replication import decode_state_vector
from tests.harness import running_issuer, running_server, stored_doc, work_order

DOCS = ("wo:c1", "wo:c2")
# Principals that all see tina's work orders; tina twice: one person, two devices.
DEVICES = ("tina", "tina", "sam", "mia", "ada")


@dataclass(frozen=True)
class Edit:
    device: int
    doc: str
    kind: str
    key: str
    value: int


@dataclass(frozen=True)
class Toggle:
    device: int  # goes offline if online, online if offline


def edits_of(docs: tuple[str, ...]) -> st.SearchStrategy[Edit]:
    """Edits by any of `DEVICES` to one of `docs`, of every kind `apply_edit` makes."""
    return st.builds(
        Edit,
        device=st.integers(0, len(DEVICES) - 1),
        doc=st.sampled_from(docs),
        kind=st.sampled_from(["field", "text", "delete", "check", "part"]),
        key=st.sampled_from(["status", "priority", "due_at", "site"]),
        value=st.integers(0, 1000),
    )


edits = edits_of(DOCS)
toggles = st.builds(Toggle, device=st.integers(0, len(DEVICES) - 1))
scenarios = st.lists(st.one_of(edits, edits, toggles), min_size=5, max_size=40)


def apply_edit(doc: Doc[Any], edit: Edit) -> None:
    # A technician's policy lets it set the status only (fieldsync/auth/policy.toml).
    key = "status" if DEVICES[edit.device] == "tina" else edit.key
    with doc.transaction():
        if edit.kind == "field":
            doc.get("fields", type=Map)[key] = f"{key}-{edit.value}"
        elif edit.kind == "text":
            notes = doc.get("notes", type=Text)
            notes.insert(edit.value % (len(notes) + 1), f"<{edit.value}>")
        elif edit.kind == "delete":
            notes = doc.get("notes", type=Text)
            if len(notes):
                start = edit.value % len(notes)
                del notes[start : min(len(notes), start + 3)]
        elif edit.kind == "check":
            checklist = doc.get("checklist", type=Array)
            if len(checklist):
                item = checklist[edit.value % len(checklist)]
                item["done"] = not item.get("done")
        else:
            doc.get("parts", type=Array).append(Map({"sku": f"P-{edit.value}", "qty": 1}))


def content(doc_id: str, doc: Doc[Any]) -> bytes:
    # yrs does not keep key order in nested maps: compare content with sorted keys.
    return orjson.dumps(documents.to_json(doc_id, doc), option=orjson.OPT_SORT_KEYS)


def same(doc_id: str, doc: Doc[Any], devices: list[Client]) -> bool:
    # State vectors are maps (their encoding's order differs between replicas), and a delete
    # moves none: compare both.
    state = decode_state_vector(doc.get_state())
    want = content(doc_id, doc)
    return all(
        decode_state_vector(d.docs[doc_id].get_state()) == state
        and content(doc_id, d.docs[doc_id]) == want
        for d in devices
    )


async def play(scenario: list[Edit | Toggle], data_dir: Path) -> None:
    async with running_issuer() as issuer, running_server(data_dir, issuer) as server:
        supervisor = server.client("sam")
        await supervisor.start()
        await supervisor.connected.wait()
        for doc_id in DOCS:
            supervisor.doc(doc_id).apply_update(work_order(doc_id).get_update())
        await supervisor.wait_acked()
        await supervisor.close()

        devices = [
            Client(server.sync_url, server.token(subject), path=data_dir / f"device{i}.db")
            for i, subject in enumerate(DEVICES)
        ]
        online = [True] * len(devices)
        for device in devices:
            await device.start()
        for device in devices:
            async with asyncio.timeout(10):
                await device.caught_up.wait()
        for step in scenario:
            device = devices[step.device]
            if isinstance(step, Toggle):
                online[step.device] = not online[step.device]
                await (device.start() if online[step.device] else device.go_offline())
            else:
                apply_edit(device.doc(step.doc), step)
            await asyncio.sleep(0)  # let the loop interleave sends, receipts and commits

        for i, device in enumerate(devices):
            if not online[i]:
                await device.start()
        for device in devices:
            await device.wait_acked(timeout=20)
        # A delete-only edit moves no clock, so "acked" may come before it is stored: compare
        # with what the store holds until both agree (or the time runs out).
        async with asyncio.timeout(20):
            while True:
                expected = {doc_id: await stored_doc(server, doc_id) for doc_id in DOCS}
                if all(same(doc_id, doc, devices) for doc_id, doc in expected.items()):
                    break
                await asyncio.sleep(0.02)
        for doc_id, doc in expected.items():
            for device in devices:
                assert content(doc_id, device.docs[doc_id]) == content(doc_id, doc)
        for device in devices:
            # Random statuses break the status machine: the server's rules correct them (and
            # every replica converged on the correction above); nothing else may go wrong.
            assert [e for e in device.errors if e["code"] != "rule_violation"] == []
            await device.close()


@settings(
    max_examples=12,
    deadline=None,
    # A failing example is reported as drawn: shrinking one that runs a server takes minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios)
def test_replicas_converge_after_random_offline_edits(scenario: list[Edit | Toggle]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(play(scenario, Path(tmp)))
