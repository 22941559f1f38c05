"""What the domain rules and the field history cost on the write path (issues 4 and 13).

    .venv/bin/python bench/write_path.py [--updates 4000] [--docs 40] [--reps 3]

Durable updates per second through the replicator's one write path (authorise, apply, rules,
field history, group commit with fsync, ack) on SQLite, with the rules on, as a ratio to the
same run without them (`Replicator(rules=documents.NO_RULES)`); and each with the field history
stored and not (its rows left out of every `Write`: what complete history costs beyond the
reading of each update's changes, which authorising a technician's write needs anyway). Runs
alternate so all four see the same machine; the WebSocket layer, the same in all, is left out,
so the ratios are the harsher ones. Writers are technicians (their updates also pass the
field-level check) moving statuses, ticking checklists, logging time and appending notes, 8
documents at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, cast

from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.auth import Principal, Role
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import Replicator
from fieldsync.storage import Committed, SQLiteBackend, Store, Write

STEPS = ("en_route", "in_progress", "on_hold", "in_progress")


class Device:
    """The least a replicator needs of a replica: who it is, and somewhere to send to."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.scope = ScopeFilter(ScopeKind.ASSIGNEE, principal.subject)
        self.origin = Origin(OriginKind.DEVICE, principal.subject)
        self.violations = 0

    def send_doc(self, doc_id: str, message: bytes) -> None:
        pass

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        pass

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        pass

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        pass

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        self.violations += 1

    def reset(self, doc_id: str, reason: str) -> None:
        pass


def workload(docs: int, updates: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The work orders (created by a supervisor) and the technician's edits, made up front."""
    seeds, edits = [], []
    replicas = {}
    for n in range(docs):
        doc_id = f"wo:bench{n}"
        doc: Doc[Any] = Doc()
        documents.work_order.write(
            doc,
            {"assignee": "tina", "team": "north", "region": "east", "status": "assigned"},
            [
                {"id": f"c{i}", "label": f"Step {i}", "required": True, "done": False}
                for i in range(5)
            ],
            by="sam",
            role="supervisor",
        )
        seeds.append((doc_id, doc.get_update()))
        replicas[doc_id] = doc
    for i in range(updates):
        doc_id = f"wo:bench{i % docs}"
        doc = replicas[doc_id]
        before = doc.get_state()
        round_ = i // docs
        # Each work order takes every kind of edit in turn: status, checklist, time, notes.
        with doc.transaction():
            match round_ % 4:
                case 0:
                    moves = round_ // 4  # en_route, in_progress, then on hold and back
                    step = STEPS[moves] if moves < 2 else STEPS[2 + moves % 2]
                    documents.work_order.set_status(
                        doc, step, by="tina", role="technician", at="2026-11-30T08:00:00Z"
                    )
                case 1:
                    checklist = doc.get("checklist", type=Array)
                    checklist[round_ % len(checklist)]["done"] = True
                case 2:
                    start = 1_000 * round_
                    doc.get("time_entries", type=Array).append(
                        Map({"by": "tina", "start": start, "end": start + 900})
                    )
                case _:
                    doc.get("notes", type=Text).insert(0, f"step {round_} done. ")
        edits.append((doc_id, doc.get_update(before)))
    return seeds, edits


class WithoutHistory:
    """The store, given every write without its field history rows."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def append(self, write: Write) -> Awaitable[Committed]:
        return self._store.append(dataclasses.replace(write, history=()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def run(
    rules: bool, history: bool, seeds: list[tuple[str, bytes]], edits: list[tuple[str, bytes]]
) -> tuple[float, float]:
    """Durable updates per second of the technician's edits, and the process's CPU time per
    update in µs (every thread: the event loop and the storage writer), which fsync's speed on
    the day does not hide."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "bench.db")
        await backend.open()
        store = backend.store if history else cast(Store, WithoutHistory(backend.store))
        replicator = Replicator(store, rules=None if rules else documents.NO_RULES)
        boss = Device(Principal("sam", frozenset({Role.SUPERVISOR}), team="north", region="east"))
        boss.scope = ScopeFilter(ScopeKind.TEAM, "north")
        tina = Device(Principal("tina", frozenset({Role.TECHNICIAN}), team="north", region="east"))
        for doc_id, update in seeds:
            room = await replicator.subscribe(boss, doc_id)
            done = (await replicator.submit(boss, room, update)).committed
            assert done is not None
            await done
        rooms = {doc_id: await replicator.subscribe(tina, doc_id) for doc_id, _ in seeds}
        started, cpu = time.perf_counter(), time.process_time()
        pending = []
        for doc_id, update in edits:
            submitted = await replicator.submit(tina, rooms[doc_id], update)
            if submitted.committed is not None:
                pending.append(submitted.committed)
            if len(pending) >= 8:  # 8 in flight, as 8 devices each waiting for its ack
                await pending.pop(0)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
        cpu_us = (time.process_time() - cpu) / len(edits) * 1e6
        await backend.close()
        return len(edits) / elapsed, cpu_us


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    seeds, edits = workload(args.docs, args.updates)
    variants = [(rules, history) for rules in (False, True) for history in (False, True)]
    runs: dict[tuple[bool, bool], list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for rules, history in variants:
            runs[rules, history].append(await run(rules, history, seeds, edits))
    rate = {v: statistics.median(r for r, _ in runs[v]) for v in variants}
    cpu = {v: statistics.median(c for _, c in runs[v]) for v in variants}
    print(f"updates: {args.updates} on {args.docs} work orders, {args.reps} reps alternating")
    print("| rules | history | durable updates/s (reps) | CPU µs/update (reps) |")
    print("|---|---|---|---|")
    for rules, history in variants:
        rates = ", ".join(f"{r:,.0f}" for r, _ in runs[rules, history])
        cpus = ", ".join(f"{c:,.0f}" for _, c in runs[rules, history])
        print(f"| {'on' if rules else 'off'} | {'on' if history else 'off'} | {rates} | {cpus} |")
    full, bare = (True, True), (False, True)
    print(f"rules on/off, durable updates/s: {rate[full] / rate[bare]:.2f} (target at least 0.70)")
    print(f"rules on/off, CPU per update: {cpu[full]:,.0f} / {cpu[bare]:,.0f} µs", end="")
    print(f" = {cpu[full] / cpu[bare]:.2f}")
    for rules in (True, False):
        on, off = cpu[rules, True], cpu[rules, False]
        name = "on" if rules else "off"
        print(
            f"history stored/not (rules {name}), CPU per update: {on:,.0f} / {off:,.0f} µs", end=""
        )
        print(f" = {on / off:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
