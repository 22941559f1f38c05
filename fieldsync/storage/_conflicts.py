"""The conflicts log: every correction a domain rule made, for supervisors to review."""

from __future__ import annotations

import time

from sqlite_utils import Database

from fieldsync.records import Origin, ScopeFilter, ScopeKind
from fieldsync.storage._types import Conflict, ConflictRecord

SCHEMA = (
    """CREATE TABLE conflicts (
        id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        doc TEXT NOT NULL,
        rule TEXT NOT NULL,
        detail TEXT NOT NULL,
        actor TEXT NOT NULL,
        origin TEXT NOT NULL,
        team TEXT,
        region TEXT,
        assignee TEXT
    )""",
    "CREATE INDEX conflicts_team ON conflicts (team, id)",
    "CREATE INDEX conflicts_region ON conflicts (region, id)",
    "CREATE INDEX conflicts_assignee ON conflicts (assignee, id)",
    "CREATE INDEX conflicts_doc ON conflicts (doc, id)",
)

_COLUMN = {ScopeKind.ASSIGNEE: "assignee", ScopeKind.TEAM: "team", ScopeKind.REGION: "region"}


INSERT = (
    "INSERT INTO conflicts (seq, at, doc, rule, detail, actor, origin, team, region, assignee)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def row(seq: int, conflict: Conflict) -> tuple[object, ...]:
    """The values of `INSERT` for `conflict`, recorded now (both backends)."""
    return (
        seq,
        time.time(),
        conflict.doc,
        conflict.rule,
        conflict.detail,
        conflict.actor,
        str(conflict.origin),
        conflict.team,
        conflict.region,
        conflict.assignee,
    )


def record(db: Database, seq: int, conflict: Conflict) -> None:
    db.execute(INSERT, row(seq, conflict))


def page(
    db: Database, scope: ScopeFilter, before_id: int | None, limit: int
) -> list[ConflictRecord]:
    if scope.kind is ScopeKind.NONE:
        return []
    where = ["id < ?"]
    params: list[object] = [before_id if before_id is not None else 1 << 62]
    if scope.kind is not ScopeKind.ALL:
        where.append(f"{_COLUMN[scope.kind]} = ?")
        params.append(scope.value)
    rows = db.execute(
        "SELECT id, seq, at, doc, rule, detail, actor, origin, team, region, assignee"
        f" FROM conflicts WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [
        ConflictRecord(
            key, seq, at, Conflict(doc, rule, detail, actor, Origin.parse(origin), *scope)
        )
        for key, seq, at, doc, rule, detail, actor, origin, *scope in rows
    ]
