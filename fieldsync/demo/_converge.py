"""The check a person can trust: every replica on every device equals the document rebuilt from
the server's store, compared as JSON content with sorted keys."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from pycrdt import Doc

from fieldsync import documents
from fieldsync.demo._devices import Device
from fieldsync.demo._server import Running
from fieldsync.replication import decode_state_vector
from fieldsync.storage import Store

TIMEOUT = 60.0


@dataclass
class Verdict:
    docs: int = 0  # documents held by at least one device
    identical: int = 0  # of which every replica equals the server's stored copy
    replicas: int = 0
    mismatches: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # doc -> the server's notes text


async def settle(server: Running, devices: list[Device], timeout: float = TIMEOUT) -> int:
    """Wait until every replica's state vector equals the server's: updates fan out to the other
    devices after their commit, a little after the last ack. Returns how many replicas still
    differ at the deadline."""
    replicator = server.replicator
    deadline = time.monotonic() + timeout
    while True:
        behind = 0
        for device in devices:
            for doc_id, doc in list(device.client.docs.items()):
                room = await replicator.room(doc_id)
                if decode_state_vector(doc.get_state()) != decode_state_vector(room.state_vector()):
                    behind += 1
        if behind == 0 or time.monotonic() > deadline:
            return behind
        await asyncio.sleep(0.05)


async def compare(store: Store, devices: list[Device]) -> Verdict:
    verdict = Verdict()
    expected: dict[str, bytes] = {}
    for doc_id in sorted({d for device in devices for d in device.client.docs}):
        content = documents.to_json(doc_id, await _stored(store, doc_id))
        expected[doc_id] = _canonical(content)
        verdict.notes[doc_id] = str(content.get("notes", ""))
    bad: set[str] = set()
    for device in devices:
        for doc_id, doc in device.client.docs.items():
            verdict.replicas += 1
            if _canonical(documents.to_json(doc_id, doc)) != expected[doc_id]:
                bad.add(doc_id)
                verdict.mismatches.append(f"{doc_id} on {device.name}")
    verdict.docs = len(expected)
    verdict.identical = len(expected) - len(bad)
    return verdict


async def _stored(store: Store, doc_id: str) -> Doc[Any]:
    """The document as the server stores it: its snapshot, then its logged updates."""
    loaded = await store.load(doc_id)
    doc: Doc[Any] = Doc()
    if loaded is not None:
        for data in ([loaded.snapshot] if loaded.snapshot else []) + loaded.updates:
            doc.apply_update(data)
    return doc


def _canonical(content: dict[str, Any]) -> bytes:
    # yrs does not keep the key order of JSON objects (DESIGN.md §9): compare with keys sorted.
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
