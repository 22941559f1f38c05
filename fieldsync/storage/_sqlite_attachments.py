"""The SQLite backend's `AttachmentStore` (schema: migration 4): its writes are jobs on the
store's one writer thread, inside a group commit; its reads run in one read snapshot."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from sqlite_utils import Database

from fieldsync.records import DocIndex
from fieldsync.storage._attachments import Attachment, Upload
from fieldsync.storage._tables import Tables

if TYPE_CHECKING:  # `_sqlite` imports the migrations, which import SCHEMA from here
    from fieldsync.storage._sqlite import Transaction

__all__ = ["SCHEMA", "SQLiteAttachments"]

# Migration 4.
SCHEMA = (
    # Content stored once under its sha256; type and dimensions as read from its bytes.
    """CREATE TABLE attachments (
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        mime TEXT NOT NULL,
        width INTEGER,
        height INTEGER,
        created_at REAL NOT NULL,
        by TEXT NOT NULL
    ) WITHOUT ROWID""",
    # The work orders an upload attached the content to: who may see one may download it. The
    # same content sent for several work orders is stored once and referenced by each.
    """CREATE TABLE attachment_refs (
        sha256 TEXT NOT NULL,
        wo TEXT NOT NULL,
        by TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (sha256, wo)
    ) WITHOUT ROWID""",
    "CREATE INDEX attachment_refs_wo ON attachment_refs (wo)",
    # tus upload resources; `received` is the durable offset (`offset` is an SQL keyword).
    """CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        wo TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        length INTEGER NOT NULL,
        received INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        completed_at REAL
    )""",
    "CREATE INDEX uploads_updated_at ON uploads (updated_at)",
)

# SQLite's default limit on host parameters in one statement is 32766 (999 before 3.32).
_IN_BATCH = 500

_UPLOAD_COLUMNS = "id, owner, wo, sha256, length, received, metadata, created_at, completed_at"
_ATTACHMENT_COLUMNS = "sha256, size, mime, width, height, created_at, by"


class SQLiteAttachments:
    """`AttachmentStore` on the tables of a `SQLiteStore` (through its `Tables` seams)."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def create_upload(self, upload: Upload) -> None:
        def create(txn: Transaction) -> None:
            _create_upload(txn.db, upload)
            if upload.completed_at is not None:
                _add_reference(txn.db, upload.sha256, upload.wo, upload.owner, upload.created_at)

        await self._tables.transact(create)

    async def upload(self, upload_id: str) -> Upload | None:
        return await self._tables.query(lambda db: _upload(db, upload_id))

    async def record_received(self, upload_id: str, before: int, after: int, at: float) -> bool:
        return await self._tables.transact(
            lambda txn: _record_received(txn.db, upload_id, before, after, at)
        )

    async def complete_upload(
        self, upload: Upload, before: int, content: Attachment, at: float
    ) -> bool:
        return await self._tables.transact(
            lambda txn: _complete_upload(txn.db, upload, before, content, at)
        )

    async def delete_upload(self, upload_id: str) -> bool:
        return await self._tables.transact(
            lambda txn: (
                txn.db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount == 1
            )
        )

    async def stale_uploads(self, idle_since: float, limit: int = 1000) -> list[str]:
        return await self._tables.query(lambda db: _stale_uploads(db, idle_since, limit))

    async def expire_upload(self, upload_id: str, idle_since: float) -> bool:
        sql = "DELETE FROM uploads WHERE id = ? AND completed_at IS NULL AND updated_at < ?"
        return await self._tables.transact(
            lambda txn: txn.db.execute(sql, (upload_id, idle_since)).rowcount == 1
        )

    async def attachment(self, sha256: str) -> Attachment | None:
        return await self._tables.query(lambda db: _attachment(db, sha256))

    async def readers(self, hashes: Collection[str]) -> dict[str, list[DocIndex]]:
        return await self._tables.query(lambda db: _readers(db, hashes))


# Writes (the writer thread, inside a group commit)


def _create_upload(db: Database, upload: Upload) -> None:
    db.execute(
        f"INSERT INTO uploads ({_UPLOAD_COLUMNS}, updated_at) VALUES ({', '.join('?' * 10)})",
        (
            upload.id,
            upload.owner,
            upload.wo,
            upload.sha256,
            upload.length,
            upload.received,
            upload.metadata,
            upload.created_at,
            upload.completed_at,
            upload.created_at,
        ),
    )


def _record_received(db: Database, upload_id: str, before: int, after: int, at: float) -> bool:
    cursor = db.execute(
        """UPDATE uploads SET received = ?, updated_at = ?
        WHERE id = ? AND received = ? AND completed_at IS NULL""",
        (after, at, upload_id, before),
    )
    return cursor.rowcount == 1


def _complete_upload(
    db: Database, upload: Upload, before: int, content: Attachment, at: float
) -> bool:
    if not _record_received(db, upload.id, before, upload.length, at):
        return False
    db.execute("UPDATE uploads SET completed_at = ? WHERE id = ?", (at, upload.id))
    db.execute(
        f"INSERT OR IGNORE INTO attachments ({_ATTACHMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            content.sha256,
            content.size,
            content.mime,
            content.width,
            content.height,
            content.created_at,
            content.by,
        ),
    )
    _add_reference(db, content.sha256, upload.wo, upload.owner, at)
    return True


def _add_reference(db: Database, sha256: str, wo: str, by: str, at: float) -> None:
    """`wo` references the content: whoever may see `wo` may download it."""
    db.execute(
        "INSERT OR IGNORE INTO attachment_refs (sha256, wo, by, at) VALUES (?, ?, ?, ?)",
        (sha256, wo, by, at),
    )


# Reads (a reader thread, one snapshot)


def _stale_uploads(db: Database, idle_since: float, limit: int) -> list[str]:
    rows = db.execute(
        "SELECT id FROM uploads WHERE completed_at IS NULL AND updated_at < ?"
        " ORDER BY updated_at LIMIT ?",
        (idle_since, limit),
    ).fetchall()
    return [row[0] for row in rows]


def _upload(db: Database, upload_id: str) -> Upload | None:
    row = db.execute(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return Upload(*row) if row else None


def _attachment(db: Database, sha256: str) -> Attachment | None:
    row = db.execute(
        f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE sha256 = ?", (sha256,)
    ).fetchone()
    return Attachment(*row) if row else None


def _readers(db: Database, hashes: Collection[str]) -> dict[str, list[DocIndex]]:
    wanted = sorted(set(hashes))
    found: dict[str, list[DocIndex]] = {}
    for start in range(0, len(wanted), _IN_BATCH):
        batch = wanted[start : start + _IN_BATCH]
        rows = db.execute(
            f"""SELECT r.sha256, d.doc, d.type, d.wo, d.assignee, d.team, d.region
            FROM attachment_refs r JOIN doc_index d ON d.doc = r.wo
            WHERE r.sha256 IN ({", ".join("?" * len(batch))}) ORDER BY r.sha256, d.doc""",
            batch,
        )
        for sha256, *index in rows:
            found.setdefault(sha256, []).append(DocIndex(*index))
    return found
