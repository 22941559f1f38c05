"""The PostgreSQL schema as numbered migrations, numbered as SQLite's (`_migrations`): the same
version brings the same concern on both. Applied at open, all that are missing with their
records in one transaction, under an advisory lock so that nodes starting together apply each
exactly once.

Every text column collates as "C" (byte order, as SQLite compares text): keyset pages, path
ranges (`path >= 'checklist.' AND path < 'checklist/'`) and sorts by due time must give the same
answers on both backends whatever locale the database was created with.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from psycopg import AsyncConnection

from fieldsync.storage._migrations import LEASES

__all__ = ["MIGRATIONS", "Migration", "migrate"]

# Any constant both sides agree on: the key of the advisory lock migrations run under.
_LOCK = 0x66_73_79_6E_63  # "fsync"

_T = 'TEXT COLLATE "C"'


@dataclass(frozen=True, slots=True)
class Migration:
    """`steps` are SQL statements run in order, or a coroutine function for more."""

    version: int
    description: str
    steps: tuple[str, ...] | Callable[[AsyncConnection], Awaitable[None]]


async def _cursor_key(conn: AsyncConnection) -> None:
    for statement in _SCREENS:
        await conn.execute(statement)
    await conn.execute(
        "INSERT INTO meta (key, value) VALUES ('cursor_key', %s)", (secrets.token_bytes(32),)
    )


_SCREENS = (
    f"ALTER TABLE doc_index ADD COLUMN site {_T}",
    f"ALTER TABLE doc_index ADD COLUMN asset_id {_T}",
    # Server clock, epoch seconds: when the document was first stored, and when it last entered
    # a done status; `reopened` counts moves from done back to an open status.
    "ALTER TABLE doc_index ADD COLUMN created_at DOUBLE PRECISION",
    "ALTER TABLE doc_index ADD COLUMN completed_at DOUBLE PRECISION",
    "ALTER TABLE doc_index ADD COLUMN reopened INTEGER NOT NULL DEFAULT 0",
    # The lists' keysets, matched by the queries' identical expression; partial, since forms
    # never appear in a list.
    """CREATE INDEX doc_index_assignee_due ON doc_index
        (assignee, coalesce(due_at, '~'), doc) WHERE type = 'wo'""",
    """CREATE INDEX doc_index_team_due ON doc_index
        (team, coalesce(due_at, '~'), doc) WHERE type = 'wo'""",
    """CREATE INDEX doc_index_region_team ON doc_index (region, coalesce(team, ''))
        WHERE type = 'wo'""",
    # Secrets and settings kept in the database, the same for every node.
    f"CREATE TABLE meta (key {_T} PRIMARY KEY, value BYTEA NOT NULL)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "change sequence, update log, snapshots, document index, scope history, devices",
        (
            # The change sequence: one row, updated by every transaction that draws numbers,
            # which therefore commit in the order of their numbers (see `_postgres`).
            """CREATE TABLE change_seq (
                one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                value BIGINT NOT NULL
            )""",
            "INSERT INTO change_seq (value) VALUES (0)",
            f"""CREATE TABLE updates (
                seq BIGINT PRIMARY KEY,
                doc {_T} NOT NULL,
                data BYTEA NOT NULL,
                origin {_T},
                actor {_T},
                at DOUBLE PRECISION
            )""",
            "CREATE INDEX updates_doc_seq ON updates (doc, seq)",
            f"""CREATE TABLE snapshots (
                doc {_T} PRIMARY KEY,
                data BYTEA NOT NULL,
                upto_seq BIGINT NOT NULL
            )""",
            # seq is the feed position `changes` pages on; it moves past last_seq when the
            # document's work order changes scope, so new readers of that scope get the forms.
            f"""CREATE TABLE doc_index (
                doc {_T} PRIMARY KEY,
                type {_T} NOT NULL,
                wo {_T},
                assignee {_T},
                team {_T},
                region {_T},
                status {_T},
                number {_T},
                title {_T},
                priority {_T},
                due_at {_T},
                seq BIGINT NOT NULL,
                last_seq BIGINT NOT NULL,
                created_seq BIGINT NOT NULL,
                log_count INTEGER NOT NULL DEFAULT 0,
                log_bytes BIGINT NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX doc_index_seq ON doc_index (seq)",
            "CREATE INDEX doc_index_assignee ON doc_index (assignee, seq)",
            "CREATE INDEX doc_index_team ON doc_index (team, seq)",
            "CREATE INDEX doc_index_region ON doc_index (region, seq)",
            "CREATE INDEX doc_index_wo ON doc_index (wo)",
            f"""CREATE TABLE scope_history (
                seq BIGINT NOT NULL,
                doc {_T} NOT NULL,
                assignee {_T},
                team {_T},
                region {_T}
            )""",
            "CREATE INDEX scope_history_seq ON scope_history (seq)",
            f"""CREATE TABLE devices (
                device_id {_T} PRIMARY KEY,
                subject {_T} NOT NULL,
                platform {_T},
                version {_T},
                last_seen DOUBLE PRECISION NOT NULL,
                last_seq BIGINT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "reference data: rows, field-level change log, retention horizon",
        (
            # `data` is the row's canonical JSON text (keys sorted), compared as text.
            f"""CREATE TABLE ref_rows (
                dataset {_T} NOT NULL,
                key {_T} NOT NULL,
                data TEXT NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (dataset, key)
            )""",
            f"""CREATE TABLE ref_changes (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                seq BIGINT NOT NULL,
                dataset {_T} NOT NULL,
                key {_T} NOT NULL,
                field {_T},
                value TEXT,
                deleted BOOLEAN NOT NULL DEFAULT FALSE
            )""",
            "CREATE INDEX ref_changes_dataset_seq ON ref_changes (dataset, seq, id)",
            f"""CREATE TABLE ref_datasets (
                dataset {_T} PRIMARY KEY,
                horizon BIGINT NOT NULL DEFAULT 0,
                seq BIGINT NOT NULL DEFAULT 0,
                rows BIGINT NOT NULL DEFAULT 0,
                imported_at DOUBLE PRECISION
            )""",
            f"""CREATE TABLE ref_marks (
                dataset {_T} NOT NULL,
                seq BIGINT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (dataset, seq)
            )""",
        ),
    ),
    Migration(3, "screens: site, asset, times and keyset indexes of doc_index", _cursor_key),
    Migration(
        4,
        "attachments: stored content, references, tus uploads",
        (
            f"""CREATE TABLE attachments (
                sha256 {_T} PRIMARY KEY,
                size BIGINT NOT NULL,
                mime {_T} NOT NULL,
                width INTEGER,
                height INTEGER,
                created_at DOUBLE PRECISION NOT NULL,
                by {_T} NOT NULL
            )""",
            f"""CREATE TABLE attachment_refs (
                sha256 {_T} NOT NULL,
                wo {_T} NOT NULL,
                by {_T} NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (sha256, wo)
            )""",
            "CREATE INDEX attachment_refs_wo ON attachment_refs (wo)",
            f"""CREATE TABLE uploads (
                id {_T} PRIMARY KEY,
                owner {_T} NOT NULL,
                wo {_T} NOT NULL,
                sha256 {_T} NOT NULL,
                length BIGINT NOT NULL,
                received BIGINT NOT NULL,
                metadata TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                completed_at DOUBLE PRECISION
            )""",
            "CREATE INDEX uploads_updated_at ON uploads (updated_at)",
        ),
    ),
    Migration(
        5,
        "conflicts: the corrections domain rules made",
        (
            f"""CREATE TABLE conflicts (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                seq BIGINT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                doc {_T} NOT NULL,
                rule {_T} NOT NULL,
                detail TEXT NOT NULL,
                actor {_T} NOT NULL,
                origin {_T} NOT NULL,
                team {_T},
                region {_T},
                assignee {_T}
            )""",
            "CREATE INDEX conflicts_team ON conflicts (team, id)",
            "CREATE INDEX conflicts_region ON conflicts (region, id)",
            "CREATE INDEX conflicts_assignee ON conflicts (assignee, id)",
            "CREATE INDEX conflicts_doc ON conflicts (doc, id)",
        ),
    ),
    Migration(
        6,
        "field history: every field change with its author, origin and change sequence",
        (
            f"""CREATE TABLE field_history (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                seq BIGINT NOT NULL,
                doc {_T} NOT NULL,
                path {_T} NOT NULL,
                old TEXT,
                new TEXT,
                actor {_T},
                origin {_T},
                at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX field_history_doc ON field_history (doc, seq, id)",
            "CREATE INDEX field_history_path ON field_history (doc, path, seq)",
        ),
    ),
    Migration(
        7,
        "outbox: an entry per change an outbound adapter receives",
        (
            # An identity never reuses an id: one an operator has seen names no other entry.
            f"""CREATE TABLE outbox (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                adapter {_T} NOT NULL,
                doc {_T} NOT NULL,
                seq BIGINT NOT NULL,
                state {_T} NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                next_at DOUBLE PRECISION NOT NULL,
                error_code {_T},
                error_message TEXT,
                error_entity TEXT
            )""",
            "CREATE UNIQUE INDEX outbox_key ON outbox (adapter, doc, seq)",
            "CREATE INDEX outbox_state ON outbox (state, adapter, doc)",
        ),
    ),
    Migration(
        8,
        "directory: the people the directory adapter last read",
        (
            f"""CREATE TABLE directory_people (
                subject {_T} PRIMARY KEY,
                name TEXT,
                mail TEXT,
                team {_T},
                region {_T},
                supervisor TEXT,
                enabled BOOLEAN NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX directory_people_team ON directory_people (team, subject)",
        ),
    ),
    Migration(
        9,
        "devices: the user's team and region, for the supervisors' view of the devices",
        (
            f"ALTER TABLE devices ADD COLUMN team {_T}",
            f"ALTER TABLE devices ADD COLUMN region {_T}",
            "CREATE INDEX devices_seen ON devices (last_seen)",
        ),
    ),
    Migration(
        10,
        LEASES,
        (
            # Times are the database's clock (`clock_timestamp()`), never a node's: the nodes'
            # clocks may disagree, the one they share decides who holds what (`_leases`).
            f"""CREATE TABLE nodes (
                node {_T} PRIMARY KEY,
                url TEXT NOT NULL,
                heartbeat TIMESTAMPTZ NOT NULL
            )""",
            # A row per document ever owned: a released lease keeps its token (expired at once),
            # so the next owner's is higher still.
            f"""CREATE TABLE leases (
                doc {_T} PRIMARY KEY,
                node {_T} NOT NULL,
                token BIGINT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            "CREATE INDEX leases_node ON leases (node, doc)",
        ),
    ),
)


async def migrate(conn: AsyncConnection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations the database has not recorded, with their records, in one
    transaction (a failure leaves the schema as it was); return the versions applied. `conn`
    must be in autocommit mode. Raises ValueError when the database records a version this code
    does not know (a newer fieldsync wrote it)."""
    known = {m.version for m in migrations}
    applied: list[int] = []
    async with conn.transaction():
        # Under the lock: two nodes starting at once cannot both apply a migration.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at DOUBLE PRECISION NOT NULL
            )"""
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        recorded = {version for (version,) in await cursor.fetchall()}
        if unknown := recorded - known:
            raise ValueError(f"database has schema versions {sorted(unknown)} unknown here")
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in recorded:
                continue
            if callable(migration.steps):
                await migration.steps(conn)
            else:
                for statement in migration.steps:
                    await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description, applied_at)"
                " VALUES (%s, %s, %s)",
                (migration.version, migration.description, time.time()),
            )
            applied.append(migration.version)
    return applied
