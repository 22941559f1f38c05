"""Backup and restore of an embedded (SQLite) data folder: `fieldsync backup DEST` while the
server runs, `fieldsync restore SRC` while it is stopped.

A backup is a folder:

    fieldsync.db        the database, one consistent snapshot (SQLite's online backup API, on a
                        read connection of its own: the server's writer never waits for it)
    attachments/ab/…    the attachment content the snapshot references, content-addressed
    backup.json         what it holds: format, moment, change seq, counts

Attachments are copied after the snapshot is taken: content is published before its record
commits and never changes once published, so every file the snapshot references exists. Every
function here blocks (file and database I/O): run it on a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from fieldsync.attachments import Blobs

__all__ = ["BackupError", "Manifest", "backup", "restore"]

DATABASE = "fieldsync.db"
ATTACHMENTS = "attachments"
MANIFEST = "backup.json"
FORMAT = 1

Progress = Callable[[int, int], None]  # (attachments copied, attachments in all)


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Manifest:
    format: int
    created_at: float
    seq: int  # the change sequence the snapshot holds
    docs: int
    attachments: int
    bytes: int


def backup(data_dir: Path, dest: Path, progress: Progress | None = None) -> Manifest:
    """Copy the data folder's database and referenced attachments into `dest` (a new or empty
    folder). The server may be running and writing."""
    source = data_dir / DATABASE
    if not source.is_file():
        raise BackupError(f"no database at {source}")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: back up into a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / DATABASE
    # Read-only, its own connection: the backup holds one read transaction (WAL: writers go
    # on), and copies every page in one step, so the copy is one committed state.
    with (
        contextlib.closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)) as db,
        contextlib.closing(sqlite3.connect(target)) as copy,
    ):
        db.execute("PRAGMA busy_timeout = 5000")
        db.backup(copy)
        copy.commit()
    seq, docs, hashes = _contents(target)
    copied = _copy_attachments(
        Blobs(data_dir / ATTACHMENTS), Blobs(dest / ATTACHMENTS), hashes, progress
    )
    manifest = Manifest(FORMAT, time.time(), seq, docs, len(hashes), copied)
    (dest / MANIFEST).write_bytes(orjson.dumps(asdict(manifest), option=orjson.OPT_INDENT_2))
    _fsync_tree(dest)
    return manifest


def restore(
    src: Path, data_dir: Path, *, force: bool, progress: Progress | None = None
) -> Manifest:
    """Put the backup at `src` in place as the data folder's database and attachments. The
    server must be stopped. Refuses to replace an existing database unless `force`."""
    manifest = read_manifest(src)
    target = data_dir / DATABASE
    if target.exists() and not force:
        raise BackupError(f"{target} exists: restoring would replace it (use --force)")
    _check(src / DATABASE)
    data_dir.mkdir(parents=True, exist_ok=True)
    staged = data_dir / f"{DATABASE}.restoring"
    shutil.copyfile(src / DATABASE, staged)
    with open(staged, "rb+") as file:
        os.fsync(file.fileno())
    _, _, hashes = _contents(staged)
    _copy_attachments(Blobs(src / ATTACHMENTS), Blobs(data_dir / ATTACHMENTS), hashes, progress)
    # The old database's write-ahead log belongs to it: left beside the restored file, SQLite
    # would replay it into the wrong database.
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / f"{DATABASE}{suffix}").unlink()
    os.replace(staged, target)
    _fsync_tree(data_dir, files=False)
    return manifest


def read_manifest(src: Path) -> Manifest:
    try:
        raw = orjson.loads((src / MANIFEST).read_bytes())
        manifest = Manifest(**raw)
    except (OSError, orjson.JSONDecodeError, TypeError) as exc:
        raise BackupError(f"{src} is not a fieldsync backup ({MANIFEST}: {exc})") from None
    if manifest.format != FORMAT:
        raise BackupError(f"{src}: backup format {manifest.format}, this fieldsync reads {FORMAT}")
    return manifest


def _check(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        result = db.execute("PRAGMA integrity_check").fetchall()
    if result != [("ok",)]:
        raise BackupError(f"{path} fails its integrity check: {result[:3]}")


def _contents(path: Path) -> tuple[int, int, list[str]]:
    """The copy's change seq, document count and referenced attachment content."""
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        ((seq,),) = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchall()
        ((docs,),) = db.execute("SELECT count(*) FROM doc_index").fetchall()
        hashes = [row[0] for row in db.execute("SELECT sha256 FROM attachments ORDER BY sha256")]
    return int(seq), int(docs), hashes


def _copy_attachments(
    source: Blobs, target: Blobs, hashes: list[str], progress: Progress | None
) -> int:
    copied = 0
    for done, sha256 in enumerate(hashes, 1):
        origin, destination = source.path(sha256), target.path(sha256)
        if not origin.is_file():
            raise BackupError(f"attachment {sha256} is referenced but missing at {origin}")
        if not destination.is_file():  # content-addressed: one there already is the same
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(destination.name + ".partial")
            shutil.copyfile(origin, partial)
            with open(partial, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(partial, destination)
            copied += destination.stat().st_size
        if progress is not None:
            progress(done, len(hashes))
    return copied


def _fsync_tree(root: Path, *, files: bool = True) -> None:
    """The folders' entries (and, with `files`, the database) on disk before we say done."""
    if files:
        with open(root / DATABASE, "rb+") as file:
            os.fsync(file.fileno())
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
