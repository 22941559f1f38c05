"""A device's offline state: the documents, the updates the server has not acknowledged (and
those held through a reset, to apply again once resynced), and the change sequence it has caught
up to. One SQLite file (or memory, for simulations)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import orjson

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    n INTEGER PRIMARY KEY, doc TEXT NOT NULL, data BLOB NOT NULL, sv TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_doc ON pending (doc, n);
CREATE TABLE IF NOT EXISTS held (
    n INTEGER PRIMARY KEY, doc TEXT NOT NULL, data BLOB NOT NULL, sv TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# An edit held through a reset, with the clocks it adds by client id (as its pending row had).
Held = tuple[bytes, dict[int, int]]


def _sv(text: str) -> dict[int, int]:
    return {int(client): clock for client, clock in orjson.loads(text).items()}


def _sv_text(sv: dict[int, int]) -> str:
    return orjson.dumps({str(k): v for k, v in sv.items()}).decode()


class LocalStore:
    """Small synchronous writes on the device's own event loop (a device has one user and one
    database; the server is where nothing may block)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path) if path else ":memory:", check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def docs(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._db.execute("SELECT id, state FROM docs").fetchall())

    def save(self, doc: str, state: bytes, pending: bytes | None, sv: dict[int, int]) -> None:
        """Persist a document's state and, for a local edit, queue the edit until acked."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO docs (id, state) VALUES (?, ?)", (doc, state))
            if pending is not None:
                self._db.execute(
                    "INSERT INTO pending (doc, data, sv) VALUES (?, ?, ?)",
                    (doc, pending, _sv_text(sv)),
                )
            self._db.execute("COMMIT")

    def forget(self, doc: str, hold: Sequence[Held] = ()) -> None:
        """Drop the document, its pending edits and any held ones; `hold` (in the same
        transaction, so that a crash keeps either the old rows or these) are edits to apply
        again once the document has resynced."""
        with self._lock:
            self._db.execute("BEGIN")
            for table, column in (("docs", "id"), ("pending", "doc"), ("held", "doc")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (doc,))
            self._insert_held(doc, hold)
            self._db.execute("COMMIT")

    def hold(self, doc: str, held: Sequence[Held]) -> None:
        """The held edits of `doc` are these now (the others were applied again)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM held WHERE doc = ?", (doc,))
            self._insert_held(doc, held)
            self._db.execute("COMMIT")

    def _insert_held(self, doc: str, held: Sequence[Held]) -> None:
        self._db.executemany(
            "INSERT INTO held (doc, data, sv) VALUES (?, ?, ?)",
            [(doc, data, _sv_text(sv)) for data, sv in held],
        )

    def held(self) -> dict[str, list[Held]]:
        """The edits held through a reset, by document, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT doc, data, sv FROM held ORDER BY n").fetchall()
        held: dict[str, list[Held]] = {}
        for doc, data, sv in rows:
            held.setdefault(doc, []).append((data, _sv(sv)))
        return held

    def acknowledge(self, doc: str, clock: dict[int, int]) -> int:
        """Drop the pending edits of `doc` that the server's durable clock covers; returns how
        many are still pending."""
        with self._lock:
            rows = self._db.execute(
                "SELECT n, sv FROM pending WHERE doc = ? ORDER BY n", (doc,)
            ).fetchall()
            done = [
                n
                for n, sv in rows
                if all(clock.get(client, 0) >= end for client, end in _sv(sv).items())
            ]
            if done:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM pending WHERE n = ?", [(n,) for n in done])
                self._db.execute("COMMIT")
            return len(rows) - len(done)

    def pending_updates(self, doc: str) -> list[Held]:
        """The unacknowledged edits of `doc`, oldest first, with the clocks each adds."""
        with self._lock:
            query = "SELECT data, sv FROM pending WHERE doc = ? ORDER BY n"
            return [(data, _sv(sv)) for data, sv in self._db.execute(query, (doc,)).fetchall()]

    def pending(self, doc: str | None = None) -> int:
        with self._lock:
            if doc is None:
                return int(self._db.execute("SELECT count(*) FROM pending").fetchone()[0])
            query = "SELECT count(*) FROM pending WHERE doc = ?"
            return int(self._db.execute(query, (doc,)).fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
