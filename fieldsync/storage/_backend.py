"""A backend: one database's implementations of the storage Protocols, opened and closed as one.

The application asks a `Backend` for each concern's Protocol and never learns which database
holds them: SQLite (embedded, one process) and PostgreSQL (cluster: several nodes, one
database) are two classes with the same attributes, passing the same contract suites
(tests/storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fieldsync.records import UNOBSERVED, Observer
from fieldsync.storage._attachments import AttachmentStore
from fieldsync.storage._directory import Directory, SQLiteDirectory
from fieldsync.storage._leases import Leases, PostgresLeases
from fieldsync.storage._outbox import Outbox, SQLiteOutbox
from fieldsync.storage._postgres import PostgresStore
from fieldsync.storage._postgres_attachments import PostgresAttachments
from fieldsync.storage._postgres_directory import PostgresDirectory
from fieldsync.storage._postgres_outbox import PostgresOutbox
from fieldsync.storage._postgres_reference import PostgresReference
from fieldsync.storage._postgres_screens import PostgresScreens
from fieldsync.storage._reference import CHUNK_ROWS, SQLiteReference
from fieldsync.storage._screens import SQLiteScreens
from fieldsync.storage._sqlite import SQLiteStore
from fieldsync.storage._sqlite_attachments import SQLiteAttachments
from fieldsync.storage._types import ReferenceStore, Screens, Store

__all__ = ["Backend", "PostgresBackend", "SQLiteBackend"]


class Backend(Protocol):
    """Every concern's Protocol on one database. Nothing works before `open()` returns; after
    `close()`, whatever was queued is committed and nothing more is accepted."""

    @property
    def store(self) -> Store:
        """Documents and their change feed, field history, conflicts, devices."""
        ...

    @property
    def screens(self) -> Screens: ...

    @property
    def reference(self) -> ReferenceStore: ...

    @property
    def attachments(self) -> AttachmentStore:
        """Uploads, stored content and the work orders that reference it."""
        ...

    @property
    def outbox(self) -> Outbox:
        """What committed changes owe the outbound adapters (DESIGN.md §7)."""
        ...

    @property
    def directory(self) -> Directory:
        """The organisation's people as the directory adapter last read them."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def leases(self, node: str, url: str, ttl: float) -> Leases | None:
        """Node `node`'s leases on the documents (cluster mode), None where one node owns them
        all (SQLite)."""
        ...


class SQLiteBackend:
    """The embedded default: every concern in one SQLite file, written by one writer thread in
    group commits and read on reader threads (see `SQLiteStore`). `reference_chunk_rows` rows of
    an import share one job of the writer; `observer` hears of every group commit; the other
    options are `SQLiteStore`'s."""

    def __init__(
        self,
        path: Path,
        *,
        compact_after_updates: int = 500,
        compact_after_bytes: int = 1 << 20,
        batch_max: int = 1000,
        reference_chunk_rows: int = CHUNK_ROWS,
        observer: Observer = UNOBSERVED,
    ) -> None:
        self.path = path
        self.store = SQLiteStore(
            path,
            compact_after_updates=compact_after_updates,
            compact_after_bytes=compact_after_bytes,
            batch_max=batch_max,
            observer=observer,
        )
        self.screens = SQLiteScreens(self.store)
        self.reference = SQLiteReference(self.store, chunk_rows=reference_chunk_rows)
        self.attachments = SQLiteAttachments(self.store)
        self.outbox = SQLiteOutbox(self.store)
        self.directory = SQLiteDirectory(self.store)

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    def leases(self, node: str, url: str, ttl: float) -> Leases | None:
        return None  # one process owns every document of its file


class PostgresBackend:
    """Cluster mode: every concern in one PostgreSQL database that several nodes share (`url`:
    a libpq URI, `postgresql://user:password@host:port/database`). Each node group-commits its
    writes on one connection and reads on a small pool (see `PostgresStore`); the change
    sequence is shared, and the feed never skips a number committed late by another node."""

    def __init__(
        self,
        url: str,
        *,
        compact_after_updates: int = 500,
        compact_after_bytes: int = 1 << 20,
        batch_max: int = 1000,
        reference_chunk_rows: int = CHUNK_ROWS,
        observer: Observer = UNOBSERVED,
    ) -> None:
        self.store = PostgresStore(
            url,
            compact_after_updates=compact_after_updates,
            compact_after_bytes=compact_after_bytes,
            batch_max=batch_max,
            observer=observer,
        )
        self.screens = PostgresScreens(self.store)
        self.reference = PostgresReference(self.store, chunk_rows=reference_chunk_rows)
        self.attachments = PostgresAttachments(self.store)
        self.outbox = PostgresOutbox(self.store)
        self.directory = PostgresDirectory(self.store)

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    def leases(self, node: str, url: str, ttl: float) -> Leases | None:
        return PostgresLeases(self.store, node, url, ttl)
