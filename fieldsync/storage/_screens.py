"""The screens' read model on SQLite: the columns migration 3 adds to `doc_index`, what the
writer keeps in them, and one query per screen (each run in one read snapshot).

The screens never load a document: everything a list shows is projected into `doc_index` when a
document is written. Lists page by keyset on (sort key, document id), so a page boundary never
moves when work orders are inserted, and each page costs an index range scan, not an OFFSET.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import orjson
import pycrdt
from sqlite_utils import Database

from fieldsync.records import ScopeFilter, ScopeKind
from fieldsync.storage._types import (
    Card,
    CardPage,
    MetricsPage,
    Position,
    TeamMetrics,
    WorkOrderRefs,
)

_T = TypeVar("_T")

# The work order status machine (issue 4) as far as the metrics need it: work is done in
# `completed` and `closed`; `cancelled` is neither done nor open.
_DONE_SQL = "('completed', 'closed')"
_ENDED_SQL = "('completed', 'closed', 'cancelled')"

# A work order without a due time sorts after every due one: ISO 8601 text starts with a digit
# (or a sign), and '~' sorts after all of them.
_NO_DUE = "~"
DUE_KEY = f"ifnull(d.due_at, '{_NO_DUE}')"

CONFLICTS_WINDOW = 24 * 3600.0


# --- migration 3 ------------------------------------------------------------------------------


def migrate_3(db: Database) -> None:
    """Columns and indexes for the screens, the cursor key, and the new columns of the documents
    already stored (their site and asset from their content, their creation time from their
    first update when it is still in the log)."""
    for statement in (
        "ALTER TABLE doc_index ADD COLUMN site TEXT",
        "ALTER TABLE doc_index ADD COLUMN asset_id TEXT",
        # Server clock, epoch seconds: when the document was first stored, and when it last
        # entered a done status; `reopened` counts moves from done back to an open status.
        "ALTER TABLE doc_index ADD COLUMN created_at REAL",
        "ALTER TABLE doc_index ADD COLUMN completed_at REAL",
        "ALTER TABLE doc_index ADD COLUMN reopened INTEGER NOT NULL DEFAULT 0",
        # The lists' keysets, matched by the queries' identical expression; partial, since forms
        # never appear in a list.
        f"""CREATE INDEX doc_index_assignee_due ON doc_index
            (assignee, ifnull(due_at, '{_NO_DUE}'), doc) WHERE type = 'wo'""",
        f"""CREATE INDEX doc_index_team_due ON doc_index
            (team, ifnull(due_at, '{_NO_DUE}'), doc) WHERE type = 'wo'""",
        # Metrics group by team with the same expression (a team-less work order is '').
        """CREATE INDEX doc_index_region_team ON doc_index (region, ifnull(team, ''))
            WHERE type = 'wo'""",
        """UPDATE doc_index SET created_at = (
            SELECT u.at FROM updates u WHERE u.seq = doc_index.created_seq)""",
    ):
        db.execute(statement)
    db.execute("INSERT INTO meta (key, value) VALUES ('cursor_key', ?)", (secrets.token_bytes(32),))
    _backfill_site_and_asset(db)


def _backfill_site_and_asset(db: Database) -> None:
    # Storage does not import `documents`, so this one-off reads the two keys of the work
    # order's `fields` map itself (DESIGN.md §2); every later write projects them as usual.
    rows = db.execute("SELECT doc FROM doc_index WHERE type = 'wo'").fetchall()
    for (doc,) in rows:
        ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
        snapshot = db.execute("SELECT data, upto_seq FROM snapshots WHERE doc = ?", (doc,))
        row = snapshot.fetchone()
        if row is not None:
            ydoc.apply_update(row[0])
        upto = row[1] if row is not None else 0
        for (data,) in db.execute(
            "SELECT data FROM updates WHERE doc = ? AND seq > ? ORDER BY seq", (doc, upto)
        ):
            ydoc.apply_update(data)
        fields = ydoc.get("fields", type=pycrdt.Map)
        db.execute(
            "UPDATE doc_index SET site = ?, asset_id = ? WHERE doc = ?",
            (_text(fields.get("site")), _text(fields.get("asset_id")), doc),
        )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


# --- what the writer keeps (used by `_sqlite._UPSERT_INDEX`) -----------------------------------

# Values of a new row: `:at` is the commit's server time, `:status` the new status.
INSERT_TIMES = {
    "created_at": ":at",
    "completed_at": f"CASE WHEN :status IN {_DONE_SQL} THEN :at END",
    "reopened": "0",
}
# On a later write: the row's columns are the old values, `excluded` the new ones.
UPDATE_TIMES = {
    "completed_at": f"""CASE WHEN excluded.status IN {_DONE_SQL}
        AND ifnull(status, '') NOT IN {_DONE_SQL} THEN excluded.completed_at
        ELSE completed_at END""",
    "reopened": f"""reopened + (ifnull(status, '') IN {_DONE_SQL}
        AND ifnull(excluded.status, '') NOT IN {_ENDED_SQL})""",
}


# --- the queries --------------------------------------------------------------------------------


class _Reader(Protocol):
    def query(self, read: Callable[[Database], _T]) -> Awaitable[_T]: ...


class SQLiteScreens:
    """`Screens` on a `SQLiteStore`: every method is one `store.query` (one snapshot)."""

    def __init__(self, store: _Reader) -> None:
        self._store = store
        self._key: bytes | None = None

    async def my_work(
        self, subject: str, scope: ScopeFilter, after: Position | None, limit: int
    ) -> CardPage:
        return await self._store.query(
            lambda db: _cards(db, scope, {"assignee": subject}, after, limit)
        )

    async def team_queue(
        self,
        scope: ScopeFilter,
        *,
        status: str | None,
        assignee: str | None,
        after: Position | None,
        limit: int,
    ) -> CardPage:
        def read(db: Database) -> CardPage:
            facets = {} if assignee is None else {"assignee": assignee}
            page = _cards(
                db, scope, facets | ({} if status is None else {"status": status}), after, limit
            )
            return CardPage(page.cards, page.next, _status_counts(db, scope, facets))

        return await self._store.query(read)

    async def region_metrics(
        self, scope: ScopeFilter, *, now: float, after: str | None, limit: int
    ) -> MetricsPage:
        return await self._store.query(lambda db: _metrics(db, scope, now, after, limit))

    async def work_order_refs(self, wo: str, forms_limit: int) -> WorkOrderRefs:
        return await self._store.query(lambda db: _refs(db, wo, forms_limit))

    async def open_work_orders(self, asset_id: str, limit: int) -> list[str]:
        query = (
            "SELECT doc FROM doc_index WHERE asset_id = ? AND type = 'wo'"
            " AND coalesce(status, '') NOT IN ('completed', 'closed', 'cancelled')"
            " ORDER BY created_seq DESC LIMIT ?"
        )
        rows = await self._store.query(lambda db: db.execute(query, (asset_id, limit)).fetchall())
        return [doc for (doc,) in rows]

    async def cursor_key(self) -> bytes:
        if self._key is None:
            rows = await self._store.query(
                lambda db: db.execute("SELECT value FROM meta WHERE key = 'cursor_key'").fetchall()
            )
            self._key = bytes(rows[0][0])
        return self._key


def _has_table(db: Database, name: str) -> bool:
    # Reference data and the conflict log arrive with their own migrations (and, in a mixed
    # deployment, may not be there yet): without them the screens show null, not an error.
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return found.fetchone() is not None


def _scope_sql(scope: ScopeFilter, params: dict[str, Any]) -> str:
    if scope.kind is ScopeKind.ALL:
        return "1"
    if scope.kind is ScopeKind.NONE:
        return "0"
    params["scope"] = scope.value
    return f"d.{scope.kind.value} = :scope"


_CARD_COLUMNS = (
    "d.doc, d.number, d.title, d.status, d.priority, d.due_at, d.site, d.asset_id, {asset}, "
    f"d.assignee, {DUE_KEY}"
)
# A reference row whose data is not a JSON object with a text `name` shows no name rather than
# failing the whole list.
_ASSET_NAME = """CASE WHEN json_valid(r.data) AND json_type(r.data, '$.name') = 'text'
    THEN json_extract(r.data, '$.name') END"""
_ASSET_JOIN = "LEFT JOIN ref_rows r ON r.dataset = 'assets' AND r.key = d.asset_id"


def _cards(
    db: Database,
    scope: ScopeFilter,
    equal: dict[str, str],
    after: Position | None,
    limit: int,
) -> CardPage:
    params: dict[str, Any] = {"limit": limit + 1}
    where = ["d.type = 'wo'", _scope_sql(scope, params)]
    for column, value in equal.items():
        where.append(f"d.{column} = :{column}")
        params[column] = value
    if after is not None:
        where.append(f"({DUE_KEY}, d.doc) > (:after_key, :after_doc)")
        params["after_key"], params["after_doc"] = after
    refs = _has_table(db, "ref_rows")
    columns = _CARD_COLUMNS.format(asset=_ASSET_NAME if refs else "NULL")
    rows = db.execute(
        f"SELECT {columns} FROM doc_index d {_ASSET_JOIN if refs else ''}"
        f" WHERE {' AND '.join(where)} ORDER BY {DUE_KEY}, d.doc LIMIT :limit",
        params,
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    cards = [Card(*row[:10]) for row in rows]
    return CardPage(cards, (rows[-1][10], rows[-1][0]) if more else None)


def _status_counts(db: Database, scope: ScopeFilter, equal: dict[str, str]) -> dict[str, int]:
    params: dict[str, Any] = {}
    where = ["d.type = 'wo'", _scope_sql(scope, params)]
    for column, value in equal.items():
        where.append(f"d.{column} = :{column}")
        params[column] = value
    rows = db.execute(
        f"SELECT ifnull(d.status, ''), count(*) FROM doc_index d WHERE {' AND '.join(where)}"
        " GROUP BY 1 ORDER BY 1",
        params,
    )
    return dict(rows.fetchall())


def _due_cutoffs(now: float) -> tuple[str, str]:
    """(today, now) as the projection writes due times: a date, or a UTC date-time."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _metrics(
    db: Database, scope: ScopeFilter, now: float, after: str | None, limit: int
) -> MetricsPage:
    params: dict[str, Any] = {"limit": limit + 1}
    params["today"], params["now"] = _due_cutoffs(now)
    # A team-less work order is grouped under '' (shown as null), which sorts first.
    where = ["d.type = 'wo'", _scope_sql(scope, params)]
    if after is not None:
        where.append("ifnull(d.team, '') > :after")
        params["after"] = after
    rows = db.execute(
        f"""SELECT ifnull(d.team, '') AS t,
            count(*),
            ifnull(sum(ifnull(d.status, '') NOT IN {_ENDED_SQL} AND d.due_at IS NOT NULL
                AND CASE WHEN length(d.due_at) = 10 THEN d.due_at < :today
                         ELSE d.due_at < :now END), 0),
            ifnull(sum(ifnull(d.status, '') IN {_DONE_SQL}), 0),
            -- Unknown times (a creation compacted away before migration 3) are left out.
            avg(CASE WHEN d.status IN {_DONE_SQL} THEN d.completed_at - d.created_at END),
            ifnull(sum(ifnull(d.status, '') IN {_DONE_SQL} AND d.reopened = 0), 0)
        FROM doc_index d WHERE {" AND ".join(where)}
        GROUP BY t ORDER BY t LIMIT :limit""",
        params,
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        return MetricsPage([], None)
    teams = [row[0] for row in rows]
    by_status = _by_team_and_status(db, scope, teams)
    conflicts = _conflicts_by_team(db, scope, teams, now)
    result = [
        TeamMetrics(
            team=team or None,
            total=total,
            by_status=by_status.get(team, {}),
            overdue=overdue,
            completed=completed,
            mean_seconds_to_complete=mean,
            first_time_fix_rate=(first / completed) if completed else None,
            conflicts_24h=None if conflicts is None else conflicts.get(team, 0),
        )
        for team, total, overdue, completed, mean, first in rows
    ]
    return MetricsPage(result, teams[-1] if more else None)


def _in_teams(teams: list[str], params: dict[str, Any], column: str) -> str:
    names = []
    for i, team in enumerate(teams):
        params[f"t{i}"] = team
        names.append(f":t{i}")
    return f"ifnull({column}, '') IN ({', '.join(names)})"


def _by_team_and_status(
    db: Database, scope: ScopeFilter, teams: list[str]
) -> dict[str, dict[str, int]]:
    params: dict[str, Any] = {}
    where = ["d.type = 'wo'", _scope_sql(scope, params), _in_teams(teams, params, "d.team")]
    counts: dict[str, dict[str, int]] = {}
    for team, status, count in db.execute(
        f"""SELECT ifnull(d.team, ''), ifnull(d.status, ''), count(*) FROM doc_index d
        WHERE {" AND ".join(where)} GROUP BY 1, 2 ORDER BY 1, 2""",
        params,
    ):
        counts.setdefault(team, {})[status] = count
    return counts


def _conflicts_by_team(
    db: Database, scope: ScopeFilter, teams: list[str], now: float
) -> dict[str, int] | None:
    # The conflict log of issue 4 keeps each conflict's team and region as they were.
    if not _has_table(db, "conflicts"):
        return None
    params: dict[str, Any] = {"since": now - CONFLICTS_WINDOW}
    where = ["c.at >= :since", _in_teams(teams, params, "c.team")]
    if scope.kind is ScopeKind.NONE:
        return {}
    if scope.kind is not ScopeKind.ALL:
        where.append(f"c.{scope.kind.value} = :scope")
        params["scope"] = scope.value
    rows = db.execute(
        f"SELECT ifnull(c.team, ''), count(*) FROM conflicts c WHERE {' AND '.join(where)}"
        " GROUP BY 1",
        params,
    )
    return dict(rows.fetchall())


def _refs(db: Database, wo: str, forms_limit: int) -> WorkOrderRefs:
    forms = [
        doc
        for (doc,) in db.execute(
            "SELECT doc FROM doc_index WHERE wo = ? AND type = 'form' ORDER BY doc LIMIT ?",
            (wo, forms_limit),
        )
    ]
    asset = None
    row = db.execute("SELECT asset_id FROM doc_index WHERE doc = ?", (wo,)).fetchone()
    if row is not None and row[0] is not None and _has_table(db, "ref_rows"):
        found = db.execute(
            "SELECT data FROM ref_rows WHERE dataset = 'assets' AND key = ?", (row[0],)
        ).fetchone()
        if found is not None:
            asset = _json_object(found[0])
    return WorkOrderRefs(forms, asset)


def _json_object(data: Any) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None
