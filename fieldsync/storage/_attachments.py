"""What attachments keep in the database, as a Protocol every backend implements: tus uploads
and their durable offset, the finished content's record, and which work orders reference it.
The bytes themselves are files (`fieldsync.attachments`); this is the metadata that says which
of them exist, whose they are, and who may read them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fieldsync.records import DocIndex

__all__ = ["Attachment", "AttachmentStore", "Upload"]


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


@runtime_checkable
class AttachmentStore(Protocol):
    """Attachment metadata. Each write is its own transaction, durable when it returns; the
    `before` offsets make concurrent writers of one upload lose cleanly rather than interleave.
    A reference is written only with content that is stored, so a referenced hash is stored
    content."""

    # Uploads

    async def create_upload(self, upload: Upload) -> None:
        """Record a new upload. One created complete (its content was stored already) also
        records that its work order references the content, in the same transaction."""
        ...

    async def upload(self, upload_id: str) -> Upload | None: ...

    async def record_received(self, upload_id: str, before: int, after: int, at: float) -> bool:
        """Move an unfinished upload's offset from `before` to `after`; False when it is no
        longer at `before` (terminated, expired, or moved by another request)."""
        ...

    async def complete_upload(
        self, upload: Upload, before: int, content: Attachment, at: float
    ) -> bool:
        """In one transaction: the last chunk recorded (from `before` to the upload's length),
        the content (unless stored already: the first record stays) and the reference of the
        upload's work order to it. False, and nothing written, when the upload is no longer at
        `before`."""
        ...

    async def delete_upload(self, upload_id: str) -> bool:
        """Forget an upload (its content, if it completed, stays); False when it was gone."""
        ...

    async def stale_uploads(self, idle_since: float, limit: int = 1000) -> list[str]:
        """Unfinished uploads untouched since `idle_since`, oldest first."""
        ...

    async def expire_upload(self, upload_id: str, idle_since: float) -> bool:
        """Delete an upload still unfinished and untouched since `idle_since`; False when it
        moved meanwhile (a chunk arrived, it completed) or is gone."""
        ...

    # Content and its references

    async def attachment(self, sha256: str) -> Attachment | None: ...

    async def readers(self, hashes: Collection[str]) -> dict[str, list[DocIndex]]:
        """For each of `hashes` that a work order references, the scope rows of the work orders
        that do, ordered by id (hashes nothing references are left out): whoever sees one of them
        may read the content (`fieldsync.auth.in_scope`)."""
        ...
