"""Attachments: photos and signed documents captured offline, sent over tus 1.0 when the device is
back, stored once under their sha256, and read by whoever may see a work order they belong to.

This is the core, free of HTTP (the tus and download endpoints of `fieldsync.api` are its
faces): uploads are created, written chunk by chunk at their offset, verified and published;
content is found for a principal, and a work order's `attachments` map is checked against what
is stored. Its records persist through a `storage.AttachmentStore`; its bytes are files
(`Blobs`).

- An upload belongs to the principal that created it and to one work order that principal may
  see and whose `attachments` it may write (the policy's `attachments` path). Its bytes are
  staged, never served; a chunk counts once durably written and its offset committed.
- On its last chunk the content is hashed and compared with the declared sha256, its type read
  from its magic number (`_media`), an image's dimensions read from its header (decompression
  bombs refused before anything is decoded); only then is it published under its sha256, and
  the work order recorded as referencing it. Refused content is deleted with its upload.
- The same content sent again is stored once. When the sender may already read it (a device
  resending after a lost answer, or attaching the same photo to another work order in its
  scope), the upload completes at creation without a byte sent; anyone else sends the bytes,
  so that knowing a hash never grants the content.
- A principal may download content that a work order in its scope references; thumbnails are
  for supervisors and above. Content absent and content out of scope answer alike, on a
  download as on a screen's `missing` flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pycrdt import Doc, Map

from fieldsync.attachments import _media
from fieldsync.attachments._blobs import Blobs, ChunkWriter, is_sha256
from fieldsync.attachments._media import ImageTooLarge, MediaType, UnsupportedMediaType
from fieldsync.attachments._thumbnails import Thumbnails
from fieldsync.auth import Policy, Principal, Role, in_scope
from fieldsync.documents import DocType, InvalidDocId, doc_type
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.periodic import Periodic
from fieldsync.storage import Attachment, AttachmentStore, Store, Upload

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "Attachments",
    "Checksum",
    "Interrupted",
    "attachment_hashes",
]

log = logging.getLogger(__name__)

# tus 1.0 checksum extension: "The Server MUST support at least the SHA1 checksum algorithm";
# sha256 is what the apps use (the content is addressed by it anyway).
CHECKSUM_ALGORITHMS = ("sha1", "sha256")

# Bytes gathered from the request before one write to disk: a 20 MB photo is some eighty thread
# hops, not thousands, and little is held in memory when the connection drops (aiohttp raises
# the loss before it hands over what it had buffered, so what was written is what is kept).
_FLUSH_BYTES = 256 * 1024
_THUMBNAIL_ROLES = frozenset({Role.SUPERVISOR, Role.MANAGER, Role.ADMIN})


class Interrupted(Exception):
    """The request carrying a chunk ended before its body did (the device lost its network)."""


class Forbidden(FieldsyncError):
    def __init__(self, what: str) -> None:
        super().__init__(ErrorCode.FORBIDDEN, f"{what}: not found or not yours")


class UploadTooLarge(FieldsyncError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorCode.UPLOAD_TOO_LARGE, f"uploads are at most {limit} bytes", max_bytes=limit
        )


class ChecksumMismatch(FieldsyncError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CHECKSUM_MISMATCH, message)


class OffsetMismatch(FieldsyncError):
    def __init__(self, offset: int) -> None:
        super().__init__(
            ErrorCode.OFFSET_MISMATCH, f"the upload is at offset {offset}", offset=offset
        )


class UploadLocked(FieldsyncError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.UPLOAD_LOCKED, "another request is writing this upload")


class NoThumbnail(FieldsyncError):
    def __init__(self, mime: str) -> None:
        super().__init__(ErrorCode.NO_THUMBNAIL, f"{mime} content has no thumbnail")


@dataclass(frozen=True, slots=True)
class Checksum:
    """A chunk's `Upload-Checksum`: the algorithm and the digest it must have."""

    algorithm: str
    digest: bytes


def attachment_hashes(doc: Doc[Any]) -> list[str]:
    """The keys of a work order's `attachments` map: the sha256 of each attached content (a key
    that is not a sha256 is listed too: it references nothing that can exist)."""
    return sorted(doc.get("attachments", type=Map).keys())


class Attachments:
    """Uploads, content and references for the principals of one server. `store` answers which
    work orders exist and their scope; `records` keeps the attachments' own rows; the files live
    under `root` (README "Attachments")."""

    def __init__(
        self,
        store: Store,
        records: AttachmentStore,
        root: Path,
        policy: Callable[[], Policy],
        *,
        max_bytes: int,
        types: frozenset[str],
        max_pixels: int,
        upload_expiry: float = 24 * 3600.0,
        thumbnail_memory: int = 64 << 20,
    ) -> None:
        self._store = store
        self.upload_expiry = upload_expiry  # seconds an unfinished upload may sit untouched
        self._records = records
        self.blobs = Blobs(root)
        self._policy = policy  # read per request: SIGHUP may replace the policy
        self.max_bytes = max_bytes
        self.types = types
        self.max_pixels = max_pixels
        self._busy: set[str] = set()
        self._thumbnails = Thumbnails(self.blobs, max_pixels=max_pixels, memory=thumbnail_memory)

    async def lifecycle(self, app: object) -> AsyncIterator[None]:
        await asyncio.to_thread(self.blobs.prepare)
        async with Periodic("upload-expiry", min(self.upload_expiry / 4, 3600.0), self.expire):
            yield
        await self._thumbnails.close()

    async def expire(self) -> int:
        """Forget the uploads left unfinished and untouched for `upload_expiry` (a device that
        gave up, or was wiped), with their staged bytes; a device that comes back to one gets
        404 and uploads again. Returns how many went."""
        idle_since = time.time() - self.upload_expiry
        gone = 0
        for upload_id in await self._records.stale_uploads(idle_since):
            if upload_id in self._busy:
                continue  # a chunk is being written to it right now
            if await self._records.expire_upload(upload_id, idle_since):
                await asyncio.to_thread(self.blobs.discard, upload_id)
                gone += 1
        if gone:
            log.info("expired %d upload(s) left unfinished for %.0f s", gone, self.upload_expiry)
        return gone

    # --- uploads --------------------------------------------------------------------------

    async def create(
        self, principal: Principal, wo: str, sha256: str, length: int, metadata: str
    ) -> Upload:
        """A new upload of `length` bytes whose content has `sha256`, for work order `wo`. It
        comes complete when the content is stored and the principal may already read it."""
        if length > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        await self._authorise_attaching(principal, wo)
        now = time.time()
        stored = await self._records.attachment(sha256)
        if stored is not None and stored.size == length and await self.may_read(principal, sha256):
            done = Upload(
                _new_id(), principal.subject, wo, sha256, length, length, metadata, now, now
            )
            await self._records.create_upload(done)  # and wo's reference to the content
            log.info("upload %s: %s… already stored, complete at creation", done.id, sha256[:12])
            return done
        if length == 0:
            raise UnsupportedMediaType("empty content is no accepted type")
        created = Upload(_new_id(), principal.subject, wo, sha256, length, 0, metadata, now)
        await asyncio.to_thread(self.blobs.create, created.id)
        try:
            await self._records.create_upload(created)
        except BaseException:
            await asyncio.to_thread(self.blobs.discard, created.id)
            raise
        log.info("upload %s: %d bytes for %s by %s", created.id, length, wo, principal.subject)
        return created

    async def upload(self, principal: Principal, upload_id: str) -> Upload:
        """The principal's upload (`Forbidden` for one absent or another's)."""
        found = None
        if upload_id.isalnum() and len(upload_id) <= 64:
            found = await self._records.upload(upload_id)
        if found is None or found.owner != principal.subject:
            raise Forbidden("this upload")
        return found

    async def receive(
        self,
        principal: Principal,
        upload_id: str,
        offset: int,
        body: AsyncIterator[bytes],
        *,
        expected: int | None = None,
        checksum: Checksum | None = None,
    ) -> Upload:
        """Append one request's body at `offset`, which must be the upload's (tus 1.0 PATCH).

        `expected` is the body's announced length. Without a `checksum`, the bytes that arrived
        before an `Interrupted` are kept, as tus 1.0 asks ("store as much of the received data
        as possible"); with one, a chunk that cannot be verified whole is dropped. The chunk
        that completes the upload publishes it, or deletes it when the content is refused."""
        async with self._exclusive(principal, upload_id) as current:
            if offset != current.received:
                raise OffsetMismatch(current.received)
            if current.complete:
                return current  # the last answer was lost; nothing more to take
            room = current.length - offset
            if expected is not None and expected > room:
                raise _beyond_length(current.length)
            received = offset + await self._write_chunk(current, body, expected, checksum)
            if received == current.length:
                return await self._finish(principal, current, offset)
            updated = await self._record(current, received)
            if offset < _media.SNIFF_BYTES <= received:
                await self._check_type_early(current)
            return updated

    async def _write_chunk(
        self,
        current: Upload,
        body: AsyncIterator[bytes],
        expected: int | None,
        checksum: Checksum | None,
    ) -> int:
        """Stage one request's body at the upload's offset, durably; return its length. An
        interrupted body keeps what arrived unless a checksum asks for all or nothing."""
        offset = current.received
        algorithm = checksum.algorithm if checksum else None
        writer = await asyncio.to_thread(self.blobs.writer, current.id, offset, algorithm)
        try:
            await _drain(body, writer, current.length - offset)
            if expected is not None and writer.written < expected:
                # The body ended early without an error from the transport: a cut as well.
                raise Interrupted(f"{writer.written} of {expected} bytes arrived")
        except Interrupted:
            if checksum is not None or writer.written == 0:
                await asyncio.to_thread(writer.abort)
                raise
            await asyncio.to_thread(writer.commit)
            await self._record(current, offset + writer.written)
            raise
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise
        if checksum is not None and writer.digest() != checksum.digest:
            await asyncio.to_thread(writer.abort)
            raise ChecksumMismatch(f"the chunk does not match its {checksum.algorithm}")
        await asyncio.to_thread(writer.commit)
        return writer.written

    async def terminate(self, principal: Principal, upload_id: str) -> None:
        """tus 1.0 termination: the upload and its staged bytes are gone. Content it completed
        stays: work orders reference it."""
        async with self._exclusive(principal, upload_id) as current:
            await self._drop(current)

    @contextlib.asynccontextmanager
    async def _exclusive(self, principal: Principal, upload_id: str) -> AsyncIterator[Upload]:
        """The principal's upload, for one request at a time: another gets 423 until it is
        done (a device retrying while the server still reads its previous attempt). The
        upload is read again once held, so it is not what an earlier request left behind."""
        await self.upload(principal, upload_id)  # ownership first: a 423 must not leak
        if upload_id in self._busy:
            raise UploadLocked()
        self._busy.add(upload_id)
        try:
            yield await self.upload(principal, upload_id)
        finally:
            self._busy.discard(upload_id)

    async def _authorise_attaching(self, principal: Principal, wo: str) -> None:
        try:
            if doc_type(wo) is not DocType.WORK_ORDER:
                raise Forbidden(wo)
        except InvalidDocId:
            raise Forbidden("that work order") from None
        policy = self._policy()
        index = await self._store.scope_index(wo)
        if (
            index is None
            or not in_scope(policy.scope(principal), index)
            or policy.forbidden_paths(principal, "wo", ["attachments"])
        ):
            raise Forbidden(wo)

    async def _record(self, current: Upload, received: int) -> Upload:
        moved = await self._records.record_received(
            current.id, current.received, received, time.time()
        )
        if not moved:  # terminated meanwhile
            raise Forbidden("this upload")
        return replace(current, received=received)

    async def _check_type_early(self, current: Upload) -> None:
        """The first bytes are in: refuse content of a type not accepted before the rest of it
        crosses a metered link."""
        head = await asyncio.to_thread(self.blobs.head, current.id, _media.SNIFF_BYTES)
        try:
            self._accepted(head)
        except FieldsyncError:
            await self._drop(current)
            raise

    async def _finish(self, principal: Principal, current: Upload, before: int) -> Upload:
        """The last chunk is staged: verify, publish, record. Refused content goes with its
        upload, and nothing of it was ever visible."""
        try:
            digest = await asyncio.to_thread(self.blobs.digest, current.id, current.length)
            if digest != current.sha256:
                raise ChecksumMismatch("the content does not match the sha256 declared for it")
            head = await asyncio.to_thread(self.blobs.head, current.id, _media.SNIFF_BYTES)
            media = self._accepted(head)
            size = await asyncio.to_thread(
                _media.inspect, self.blobs.staged(current.id), media, self.max_pixels
            )
        except (ChecksumMismatch, UnsupportedMediaType, ImageTooLarge) as refused:
            log.info("upload %s refused: %s", current.id, refused.code)
            await self._drop(current)
            raise
        now = time.time()
        width, height = size if size is not None else (None, None)
        content = Attachment(
            current.sha256, current.length, media.mime, width, height, now, principal.subject
        )
        new = await asyncio.to_thread(self.blobs.publish, current.id, current.sha256)
        done = await self._records.complete_upload(current, before, content, now)
        if not done:
            raise Forbidden("this upload")
        log.info(
            "upload %s complete: %s… %s, %d bytes%s",
            current.id,
            current.sha256[:12],
            media.mime,
            current.length,
            "" if new else " (stored already)",
        )
        return replace(current, received=current.length, completed_at=now)

    def _accepted(self, head: bytes) -> MediaType:
        media = _media.sniff(head)
        if media is None:
            raise UnsupportedMediaType(
                f"the content is none of the accepted types ({', '.join(sorted(self.types))})"
            )
        if media.mime not in self.types:
            raise UnsupportedMediaType(f"{media.mime} is not accepted here")
        return media

    async def _drop(self, current: Upload) -> None:
        await self._records.delete_upload(current.id)
        await asyncio.to_thread(self.blobs.discard, current.id)

    # --- content --------------------------------------------------------------------------

    async def may_read(self, principal: Principal, sha256: str) -> bool:
        """Whether a work order in the principal's scope references the content."""
        return sha256 in await self.readable_among(principal, [sha256])

    async def readable_among(self, principal: Principal, hashes: list[str]) -> set[str]:
        """Those of `hashes` whose content the principal may read: stored, and referenced by a
        work order in its scope."""
        readers = await self._records.readers(hashes)
        scope = self._policy().scope(principal)
        return {
            sha256
            for sha256, indexes in readers.items()
            if any(in_scope(scope, index) for index in indexes)
        }

    async def readable(self, principal: Principal, sha256: str) -> Attachment:
        """The stored content `principal` may read (`Forbidden` otherwise, absent alike)."""
        if not is_sha256(sha256):
            raise Forbidden("this attachment")
        found = await self._records.attachment(sha256)
        if found is None or not await self.may_read(principal, sha256):
            raise Forbidden("this attachment")
        return found

    async def read(self, sha256: str, start: int, length: int) -> AsyncIterator[bytes]:
        """The content's bytes from `start`, read in a worker thread piece by piece."""
        pieces: Generator[bytes, None, None] = self.blobs.read(sha256, start, length)
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield piece
        finally:
            await asyncio.to_thread(pieces.close)

    async def thumbnail(self, principal: Principal, sha256: str) -> bytes:
        """A small JPEG of a photo, for supervisors and above; made once, then cached, in
        bounded memory (`no_thumbnail` for an image too large to decode within it)."""
        if not principal.roles & _THUMBNAIL_ROLES:
            raise FieldsyncError(ErrorCode.FORBIDDEN, "thumbnails are for supervisors")
        found = await self.readable(principal, sha256)
        media = _media.TYPES.get(found.mime)
        if media is None or media.image is None:
            raise NoThumbnail(found.mime)
        try:
            return await self._thumbnails.get(sha256, media)
        except FieldsyncError as refused:
            if refused.code is not ErrorCode.NO_THUMBNAIL:
                # Stored before a lower pixel limit: the content stays downloadable.
                log.warning("no thumbnail of %s…: %s", sha256[:12], refused.code)
                raise NoThumbnail(found.mime) from None
            raise
        except (OSError, ValueError, MemoryError) as failed:
            # An image Pillow cannot render (a truncated JPEG, an exotic PNG mode).
            log.warning("no thumbnail of %s…: %r", sha256[:12], failed)
            raise NoThumbnail(found.mime) from None

    # --- references from documents -------------------------------------------------------

    async def unresolved_attachments(self, principal: Principal, doc: Doc[Any]) -> list[str]:
        """The keys of a work order's `attachments` map that reference no content `principal`
        may read: an unknown hash, an upload not finished yet, or content that only work orders
        out of its scope reference. The last looks like the others, so that naming a hash in a
        work order one may write never tells whether someone stored that content (the rule of
        `readable`). They are flagged, never dropped: the upload may still come."""
        keys = attachment_hashes(doc)  # read on the loop: a pycrdt Doc stays on its thread
        valid = [key for key in keys if is_sha256(key)]
        readable = await self.readable_among(principal, valid) if valid else set()
        return [key for key in keys if key not in readable]

    async def describe(self, principal: Principal, doc: Doc[Any]) -> dict[str, dict[str, Any]]:
        """A work order's `attachments` map as JSON for `principal`'s screen: each entry as the
        document holds it (mime, size, caption, by, at) plus `missing`, true unless the content
        is stored and `principal` may read it (`unresolved_attachments`)."""
        entries = {
            key: value if isinstance(value, dict) else {}
            for key, value in doc.get("attachments", type=Map).to_py().items()
        }
        missing = set(await self.unresolved_attachments(principal, doc))
        return {key: {**entry, "missing": key in missing} for key, entry in entries.items()}


async def _drain(body: AsyncIterator[bytes], writer: ChunkWriter, room: int) -> None:
    """Write the body through `writer`, `_FLUSH_BYTES` at a time, refusing anything past `room`
    (the bytes the upload still lacks)."""
    pending = bytearray()
    taken = 0
    try:
        async for data in body:
            taken += len(data)
            if taken > room:
                raise _beyond_length(writer.start + room)
            pending += data
            if len(pending) >= _FLUSH_BYTES:
                chunk, pending = bytes(pending), bytearray()
                await asyncio.to_thread(writer.write, chunk)
    except Interrupted:
        if pending:  # what arrived before the cut is kept too (the caller decides on it)
            await asyncio.to_thread(writer.write, bytes(pending))
        raise
    if pending:
        await asyncio.to_thread(writer.write, bytes(pending))


def _beyond_length(length: int) -> FieldsyncError:
    return FieldsyncError(
        ErrorCode.UPLOAD_TOO_LARGE, f"the chunk goes past the upload's length ({length} bytes)"
    )


def _new_id() -> str:
    return secrets.token_hex(16)
