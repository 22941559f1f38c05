"""What a group commit costs the SQLite writer thread, by how many updates share it.

    .venv/bin/python bench/commit_cost.py [--docs 20] [--updates 600]

The real `SQLiteStore` (WAL, `synchronous=FULL`) in a temporary folder; updates of the S1 kind
(a few bytes appended to a work order's notes, one field-history row, the index unchanged) to
documents taken at random, appended 1, 3, 8 and 200 at a time so that each group is one commit.
Prints the writer thread's CPU (its own clock: the kernel's share of the fsync included, other
processes not) per update and per commit, and, for scale, the CPU of an fsynced commit of one
tiny row in a bare SQLite file. `bench/README.md` ("second pass") explains what the figures say.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pycrdt

from fieldsync.records import DocIndex, FieldChange, Origin, OriginKind
from fieldsync.storage import Write
from fieldsync.storage._sqlite import SQLiteStore

TECHNICIAN = Origin(OriginKind.DEVICE, "bench")


class TimedStore(SQLiteStore):
    """The store, with the writer thread's CPU clock around each group commit."""

    cpu_ns = 0
    commits = 0

    def _commit_batch(self, db: Any, batch: list[Any]) -> None:
        started = time.thread_time_ns()
        try:
            super()._commit_batch(db, batch)
        finally:
            self.cpu_ns += time.thread_time_ns() - started
            self.commits += 1


def bare_commit_us(folder: Path, commits: int = 300) -> float:
    """CPU per fsynced commit of one small row: the floor under any commit."""
    conn = sqlite3.connect(folder / "bare.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")
        started = time.thread_time_ns()
        for _ in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (data) VALUES (?)", (os.urandom(100),))
            conn.execute("COMMIT")
        return (time.thread_time_ns() - started) / commits / 1000
    finally:
        conn.close()


async def per_update_us(
    folder: Path, docs: int, updates: int, together: int
) -> tuple[float, float]:
    """(CPU µs per update, per commit) with `together` updates in each commit."""
    store = TimedStore(folder / f"store-{together}.db")
    await store.open()
    replicas = {f"wo:{n}": pycrdt.Doc[Any]() for n in range(docs)}
    rng = random.Random(together)

    def write(doc_id: str) -> Write:
        ydoc = replicas[doc_id]
        before = ydoc.get_state()
        ydoc.get("notes", type=pycrdt.Text).insert(0, "note ")
        index = DocIndex(doc_id, "wo", doc_id, assignee="tina", team="north", status="assigned")
        change = FieldChange("notes", None, "note ")
        return Write(doc_id, ydoc.get_update(before), TECHNICIAN, "tina", index, (change,))

    try:
        for doc_id in replicas:  # every row exists before the timing starts
            await store.append(write(doc_id))
        store.cpu_ns = store.commits = 0
        names = list(replicas)
        for _ in range(max(3, updates // together)):
            await asyncio.gather(*(store.append(write(rng.choice(names))) for _ in range(together)))
        done = max(3, updates // together) * together
        return store.cpu_ns / done / 1000, store.cpu_ns / max(store.commits, 1) / 1000
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--updates", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"fsynced commit of one small row, bare SQLite: {bare_commit_us(folder):.0f} µs CPU")
        print("| updates per commit | µs CPU per update | µs CPU per commit |")
        print("|---:|---:|---:|")
        for together in (1, 3, 8, 200):
            update_us, commit_us = await per_update_us(folder, args.docs, args.updates, together)
            print(f"| {together} | {update_us:.0f} | {commit_us:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
