"""The SQLite schema as numbered migrations, applied in order at open and recorded once each.

A migration is frozen once released: a schema change is a new entry at the end of `MIGRATIONS`,
never an edit of an old one, so every database reaches the same schema by the same steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlite_utils import Database

from fieldsync.storage import _conflicts, _directory, _outbox, _screens, _sqlite_attachments


@dataclass(frozen=True, slots=True)
class Migration:
    """`steps` are SQL statements run one by one, or a function for changes SQL cannot express.

    Statements rather than one script: `sqlite3.executescript` commits the open transaction
    first, so a migration failing halfway would leave half a schema recorded as nothing."""

    version: int
    description: str
    steps: tuple[str, ...] | Callable[[Database], None]


# Described alike on both backends (PostgreSQL's migration 10 creates the tables).
LEASES = "cluster: a lease per document with its fencing token, and the nodes' registry"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "change sequence, update log, snapshots, document index, scope history, devices",
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
            "INSERT INTO meta (key, value) VALUES ('seq', 0)",
            # seq is given by the writer from meta, never by rowid reuse: compaction deletes
            # rows, and a reused seq would hide an update from readers that already passed it.
            """CREATE TABLE updates (
                seq INTEGER PRIMARY KEY,
                doc TEXT NOT NULL,
                data BLOB NOT NULL,
                origin TEXT,
                actor TEXT,
                at REAL
            )""",
            "CREATE INDEX updates_doc_seq ON updates (doc, seq)",
            """CREATE TABLE snapshots (
                doc TEXT PRIMARY KEY,
                data BLOB NOT NULL,
                upto_seq INTEGER NOT NULL
            )""",
            # seq is the feed position `changes` pages on; it moves past last_seq when the
            # document's work order changes scope, so new readers of that scope get the forms.
            """CREATE TABLE doc_index (
                doc TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                wo TEXT,
                assignee TEXT,
                team TEXT,
                region TEXT,
                status TEXT,
                number TEXT,
                title TEXT,
                priority TEXT,
                due_at TEXT,
                seq INTEGER NOT NULL,
                last_seq INTEGER NOT NULL,
                created_seq INTEGER NOT NULL,
                log_count INTEGER NOT NULL DEFAULT 0,
                log_bytes INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX doc_index_seq ON doc_index (seq)",
            "CREATE INDEX doc_index_assignee ON doc_index (assignee, seq)",
            "CREATE INDEX doc_index_team ON doc_index (team, seq)",
            "CREATE INDEX doc_index_region ON doc_index (region, seq)",
            "CREATE INDEX doc_index_wo ON doc_index (wo)",
            # A work order's scope values before each change, so a reader of the old scope can
            # be told the document (and its forms) left it.
            """CREATE TABLE scope_history (
                seq INTEGER NOT NULL,
                doc TEXT NOT NULL,
                assignee TEXT,
                team TEXT,
                region TEXT
            )""",
            "CREATE INDEX scope_history_seq ON scope_history (seq)",
            """CREATE TABLE devices (
                device_id TEXT PRIMARY KEY,
                subject TEXT NOT NULL,
                platform TEXT,
                version TEXT,
                last_seen REAL NOT NULL,
                last_seq INTEGER NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "reference data: rows, field-level change log, retention horizon",
        (
            # One row per (dataset, key): `data` is the row's JSON object (canonical: keys
            # sorted, so an unchanged row compares equal as text), `seq` its last change.
            """CREATE TABLE ref_rows (
                dataset TEXT NOT NULL,
                key TEXT NOT NULL,
                data TEXT NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (dataset, key)
            ) WITHOUT ROWID""",
            # One entry per changed field of a row change, all under that row change's seq (from
            # the global change sequence); `value` is JSON, NULL when the field was removed; a
            # deleted row is one entry with `deleted` = 1 and no field.
            """CREATE TABLE ref_changes (
                seq INTEGER NOT NULL,
                dataset TEXT NOT NULL,
                key TEXT NOT NULL,
                field TEXT,
                value TEXT,
                deleted INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX ref_changes_dataset_seq ON ref_changes (dataset, seq)",
            # `horizon`: the oldest `since` still answerable (the changes up to it are
            # compacted away); `seq`: the dataset's last change, which also names its snapshot.
            """CREATE TABLE ref_datasets (
                dataset TEXT PRIMARY KEY,
                horizon INTEGER NOT NULL DEFAULT 0,
                seq INTEGER NOT NULL DEFAULT 0,
                rows INTEGER NOT NULL DEFAULT 0,
                imported_at REAL
            )""",
            # When each import chunk committed, with the last seq it drew: how compaction turns
            # a retention period into a seq without a time on every change entry.
            """CREATE TABLE ref_marks (
                dataset TEXT NOT NULL,
                seq INTEGER NOT NULL,
                at REAL NOT NULL,
                PRIMARY KEY (dataset, seq)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(3, "screens: site, asset, times and keyset indexes of doc_index", _screens.migrate_3),
    Migration(
        4, "attachments: stored content, references, tus uploads", _sqlite_attachments.SCHEMA
    ),
    Migration(5, "conflicts: the corrections domain rules made", _conflicts.SCHEMA),
    Migration(
        6,
        "field history: every field change with its author, origin and change sequence",
        (
            """CREATE TABLE field_history (
                seq INTEGER NOT NULL,
                doc TEXT NOT NULL,
                path TEXT NOT NULL,
                old TEXT,
                new TEXT,
                actor TEXT,
                origin TEXT,
                at REAL NOT NULL
            )""",
            "CREATE INDEX field_history_doc ON field_history (doc, seq)",
            "CREATE INDEX field_history_path ON field_history (doc, path, seq)",
        ),
    ),
    Migration(7, "outbox: an entry per change an outbound adapter receives", _outbox.SCHEMA),
    Migration(8, "directory: the people the directory adapter last read", _directory.SCHEMA),
    Migration(
        9,
        "devices: the user's team and region, for the supervisors' view of the devices",
        (
            "ALTER TABLE devices ADD COLUMN team TEXT",
            "ALTER TABLE devices ADD COLUMN region TEXT",
            "CREATE INDEX devices_seen ON devices (last_seen)",
        ),
    ),
    # One SQLite node owns every document: nothing to record (the number stays aligned with
    # PostgreSQL's migration 10, which brings the same concern there).
    Migration(10, LEASES, ()),
)


def migrate(db: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations `db` has not recorded, each with its record in one transaction;
    return the versions applied.

    `db` must be in driver autocommit mode (`isolation_level=None`). Raises ValueError when the
    database records a version this code does not know: it was written by a newer fieldsync."""
    db.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at REAL NOT NULL
        )"""
    )
    known = {m.version for m in migrations}
    applied: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        # The check runs under the write lock so two processes opening one file at the same
        # time cannot both apply a migration.
        db.execute("BEGIN IMMEDIATE")
        try:
            recorded = {v for (v,) in db.execute("SELECT version FROM schema_migrations")}
            if unknown := recorded - known:
                raise ValueError(f"database has schema versions {sorted(unknown)} unknown here")
            if migration.version not in recorded:
                _apply(db, migration)
                applied.append(migration.version)
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
    return applied


def _apply(db: Database, migration: Migration) -> None:
    if callable(migration.steps):
        migration.steps(db)
    else:
        for statement in migration.steps:
            db.execute(statement)
    db.execute(
        "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
        (migration.version, migration.description, time.time()),
    )
