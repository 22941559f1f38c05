"""Attachment bytes on disk: a staging area for uploads in progress, and the content itself,
stored once under its sha256.

    <root>/ab/cdef…                 content, named by its sha256 in hex: two characters of
                                    fan-out, then the other 62 (a file never changes once there)
    <root>/staging/<upload id>      an upload in progress: never served, moved into place only
                                    once complete and verified
    <root>/thumbnails/ab/cdef….jpg  thumbnails made from the content, a cache (safe to delete)

Staging and content share one file system, so publishing is one atomic `os.replace`: a reader
sees all of a file or none of it. Every method here blocks (file I/O, fsync, hashing): call them
from a worker thread, never on the event loop.

The files belong to attachments, not to `storage`: their layout (a tus staging area, a thumbnail
cache) is the attachments' own, and it is the same whichever database backend keeps the records
(`storage.AttachmentStore`), so it is no backend's to implement.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Generator
from pathlib import Path
from typing import BinaryIO

__all__ = ["Blobs", "ChunkWriter", "is_sha256"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ = 1 << 20


def is_sha256(text: str) -> bool:
    """Whether `text` names content here: a sha256 in lower-case hex."""
    return _SHA256.fullmatch(text) is not None


class ChunkWriter:
    """Appends one request's bytes to a staged upload, hashing them as they come for the chunk's
    `Upload-Checksum`. Nothing it writes counts until the caller records the new offset: a chunk
    given up on is cut off again by `abort`, or by the next writer, which starts at the recorded
    offset."""

    def __init__(self, file: BinaryIO, offset: int, algorithm: str | None) -> None:
        self._file = file
        self.start = offset
        self.written = 0
        self._hash = hashlib.new(algorithm) if algorithm else None

    def write(self, data: bytes) -> None:
        self._file.write(data)
        if self._hash is not None:
            self._hash.update(data)
        self.written += len(data)

    def digest(self) -> bytes | None:
        return None if self._hash is None else self._hash.digest()

    def commit(self) -> None:
        """Make what was written durable, so the offset recorded next is true after a crash."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Forget this chunk: the staged file ends at the offset it started from again."""
        try:
            self._file.truncate(self.start)
        finally:
            self._file.close()


class Blobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / "staging"
        self._thumbnails = root / "thumbnails"

    def prepare(self) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        self._thumbnails.mkdir(parents=True, exist_ok=True)

    # Content

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError("not a sha256")
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def read(
        self, sha256: str, start: int, length: int, chunk: int = _READ
    ) -> Generator[bytes, None, None]:
        """`length` bytes of the content from `start`, in pieces of at most `chunk` bytes. A
        generator: each `next()` blocks on the file."""
        with self.path(sha256).open("rb") as file:
            file.seek(start)
            left = length
            while left > 0:
                data = file.read(min(chunk, left))
                if not data:
                    raise OSError(f"{sha256[:12]}… ended before its recorded size")
                left -= len(data)
                yield data

    # Uploads in progress

    def staged(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise ValueError("not an upload id")
        return self._staging / upload_id

    def create(self, upload_id: str) -> None:
        self.staged(upload_id).touch(exist_ok=False)

    def writer(self, upload_id: str, offset: int, algorithm: str | None) -> ChunkWriter:
        """A writer that appends at `offset`, the upload's recorded offset; whatever a
        chunk that was never recorded left beyond it is cut off first."""
        file = self.staged(upload_id).open("r+b")
        try:
            file.truncate(offset)
            file.seek(offset)
        except BaseException:
            file.close()
            raise
        return ChunkWriter(file, offset, algorithm)

    def head(self, upload_id: str, length: int) -> bytes:
        with self.staged(upload_id).open("rb") as file:
            return file.read(length)

    def digest(self, upload_id: str, length: int) -> str:
        """The sha256 (hex) of the first `length` bytes staged: the upload's whole content."""
        digest = hashlib.sha256()
        with self.staged(upload_id).open("rb") as file:
            left = length
            while left > 0 and (data := file.read(min(_READ, left))):
                digest.update(data)
                left -= len(data)
        return digest.hexdigest()

    def publish(self, upload_id: str, sha256: str) -> bool:
        """Move a verified upload into place under its sha256; False when that content was
        already stored (the staged copy is then dropped: content is stored once)."""
        staged, target = self.staged(upload_id), self.path(sha256)
        if target.is_file():
            staged.unlink(missing_ok=True)
            return False
        target.parent.mkdir(exist_ok=True)
        os.chmod(staged, 0o444)  # content never changes once published
        os.replace(staged, target)
        _fsync_dir(target.parent)
        return True

    def discard(self, upload_id: str) -> None:
        self.staged(upload_id).unlink(missing_ok=True)

    # Thumbnails

    def thumbnail(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError("not a sha256")
        return self._thumbnails / sha256[:2] / f"{sha256[2:]}.jpg"

    def read_thumbnail(self, sha256: str) -> bytes | None:
        try:
            return self.thumbnail(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def write_thumbnail(self, sha256: str, data: bytes) -> None:
        """Atomically: two requests making the same thumbnail at once both leave a whole file."""
        target = self.thumbnail(sha256)
        target.parent.mkdir(exist_ok=True)
        temporary = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)


def _fsync_dir(path: Path) -> None:
    """A rename is durable once its directory is (POSIX leaves it to the file system)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
