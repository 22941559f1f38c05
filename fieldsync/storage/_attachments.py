"""Attachment metadata: uploads in progress, stored content, and the work orders that reference
it (schema: migration 4). Plain functions of a `Transaction` (run them with `transact`, on the
writer thread, inside a group commit) or of a `Database` (run them with `query`, in a read
snapshot); the bytes themselves are in `Blobs`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from sqlite_utils import Database

from fieldsync.records import DocIndex

if TYPE_CHECKING:  # `_sqlite` imports the migrations, which import SCHEMA from here
    from fieldsync.storage._sqlite import Transaction

__all__ = [
    "SCHEMA",
    "Attachment",
    "Tables",
    "Upload",
    "add_reference",
    "attachment",
    "complete_upload",
    "create_upload",
    "delete_upload",
    "expire_upload",
    "readers_of",
    "record_received",
    "stale_uploads",
    "stored_among",
    "upload",
]

_T = TypeVar("_T")

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


@runtime_checkable
class Tables(Protocol):
    """A store that keeps tables of its own concerns beside the documents (`SQLiteStore`)."""

    def transact(self, work: Callable[[Transaction], _T]) -> Awaitable[_T]: ...

    async def query(self, read: Callable[[Database], _T]) -> _T: ...


@dataclass(frozen=True, slots=True)
class Upload:
    """A tus upload resource. `received` is the offset durably staged; the upload is complete
    (and its content stored) once `completed_at` is set, and only then."""

    id: str
    owner: str  # subject of the principal that created it: the only one who may touch it
    wo: str  # the work order it is attached to
    sha256: str  # declared by the client, verified on completion
    length: int
    received: int
    metadata: str  # the `Upload-Metadata` header as received, given back by HEAD
    created_at: float
    completed_at: float | None = None

    @property
    def complete(self) -> bool:
        return self.completed_at is not None


@dataclass(frozen=True, slots=True)
class Attachment:
    """Stored content: verified, type checked from its bytes, on disk once."""

    sha256: str
    size: int
    mime: str
    width: int | None
    height: int | None
    created_at: float
    by: str


_UPLOAD_COLUMNS = "id, owner, wo, sha256, length, received, metadata, created_at, completed_at"
_ATTACHMENT_COLUMNS = "sha256, size, mime, width, height, created_at, by"


# Writes (the writer thread)


def create_upload(txn: Transaction, upload: Upload) -> None:
    txn.db.execute(
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


def record_received(txn: Transaction, upload_id: str, before: int, after: int, at: float) -> bool:
    """Move an unfinished upload's offset from `before` to `after`; False when it is no longer
    at `before` (terminated, or moved by another request)."""
    cursor = txn.db.execute(
        """UPDATE uploads SET received = ?, updated_at = ?
        WHERE id = ? AND received = ? AND completed_at IS NULL""",
        (after, at, upload_id, before),
    )
    return cursor.rowcount == 1


def complete_upload(
    txn: Transaction, upload: Upload, before: int, content: Attachment, at: float
) -> bool:
    """Record the last chunk, the content (unless stored already: the first upload's record
    stays) and the work order's reference to it, in one transaction; False when the upload is
    no longer at `before`."""
    if not record_received(txn, upload.id, before, upload.length, at):
        return False
    txn.db.execute("UPDATE uploads SET completed_at = ? WHERE id = ?", (at, upload.id))
    txn.db.execute(
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
    add_reference(txn, content.sha256, upload.wo, upload.owner, at)
    return True


def add_reference(txn: Transaction, sha256: str, wo: str, by: str, at: float) -> None:
    """`wo` references the content: whoever may see `wo` may download it."""
    txn.db.execute(
        "INSERT OR IGNORE INTO attachment_refs (sha256, wo, by, at) VALUES (?, ?, ?, ?)",
        (sha256, wo, by, at),
    )


def delete_upload(txn: Transaction, upload_id: str) -> bool:
    return txn.db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount == 1


def expire_upload(txn: Transaction, upload_id: str, idle_since: float) -> bool:
    """Delete an upload still unfinished and untouched since `idle_since`; False when it moved
    meanwhile (a chunk arrived, it completed) or is gone."""
    return (
        txn.db.execute(
            "DELETE FROM uploads WHERE id = ? AND completed_at IS NULL AND updated_at < ?",
            (upload_id, idle_since),
        ).rowcount
        == 1
    )


# Reads (a reader thread, one snapshot)


def stale_uploads(db: Database, idle_since: float, limit: int = 1000) -> list[str]:
    """Unfinished uploads untouched since `idle_since`, oldest first."""
    rows = db.execute(
        "SELECT id FROM uploads WHERE completed_at IS NULL AND updated_at < ?"
        " ORDER BY updated_at LIMIT ?",
        (idle_since, limit),
    ).fetchall()
    return [row[0] for row in rows]


def upload(db: Database, upload_id: str) -> Upload | None:
    row = db.execute(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return Upload(*row) if row else None


def attachment(db: Database, sha256: str) -> Attachment | None:
    row = db.execute(
        f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE sha256 = ?", (sha256,)
    ).fetchone()
    return Attachment(*row) if row else None


def readers_of(db: Database, sha256: str) -> list[DocIndex]:
    """The scope rows of the work orders that reference the content: a principal who sees one
    of them may download it (`fieldsync.auth.in_scope`)."""
    rows = db.execute(
        """SELECT d.doc, d.type, d.wo, d.assignee, d.team, d.region
        FROM attachment_refs r JOIN doc_index d ON d.doc = r.wo
        WHERE r.sha256 = ? ORDER BY d.doc""",
        (sha256,),
    )
    return [DocIndex(*row) for row in rows]


def stored_among(db: Database, hashes: Iterable[str]) -> set[str]:
    """Those of `hashes` whose content is stored."""
    wanted = sorted(set(hashes))
    found: set[str] = set()
    for start in range(0, len(wanted), _IN_BATCH):
        batch = wanted[start : start + _IN_BATCH]
        marks = ", ".join("?" * len(batch))
        rows = db.execute(f"SELECT sha256 FROM attachments WHERE sha256 IN ({marks})", batch)
        found.update(sha for (sha,) in rows)
    return found
