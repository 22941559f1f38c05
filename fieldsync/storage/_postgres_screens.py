"""The screens' read model on PostgreSQL: the same queries as SQLite's (`_screens`), in
PostgreSQL's words, each run in one snapshot. The columns they read are kept by the writer
(`_postgres._UPSERT_INDEX`); text collates as "C" there, so keys sort as on SQLite."""

from __future__ import annotations

from typing import Any

import orjson
from psycopg import AsyncConnection

from fieldsync.records import ScopeFilter, ScopeKind
from fieldsync.storage._postgres import PostgresStore
from fieldsync.storage._screens import CONFLICTS_WINDOW, _due_cutoffs
from fieldsync.storage._types import (
    Card,
    CardPage,
    MetricsPage,
    Position,
    TeamMetrics,
    WorkOrderRefs,
)

__all__ = ["PostgresScreens"]

_DONE = "('completed', 'closed')"
_ENDED = "('completed', 'closed', 'cancelled')"
# A work order without a due time sorts after every due one ('~' after any ISO 8601 text), the
# expression the keyset indexes of migration 3 are built on.
_DUE_KEY = "coalesce(d.due_at, '~')"
# A reference row whose `name` is not text shows no name rather than failing the whole list.
_ASSET_NAME = """CASE WHEN jsonb_typeof(r.data::jsonb -> 'name') = 'string'
    THEN r.data::jsonb ->> 'name' END"""
_CARD_COLUMNS = (
    "d.doc, d.number, d.title, d.status, d.priority, d.due_at, d.site, d.asset_id, "
    f"{_ASSET_NAME}, d.assignee, {_DUE_KEY}"
)
_ASSET_JOIN = "LEFT JOIN ref_rows r ON r.dataset = 'assets' AND r.key = d.asset_id"


class PostgresScreens:
    """`Screens` on a `PostgresStore`: every method is one `store.query` (one snapshot)."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._key: bytes | None = None

    async def my_work(
        self, subject: str, scope: ScopeFilter, after: Position | None, limit: int
    ) -> CardPage:
        return await self._store.query(
            lambda conn: _cards(conn, scope, {"assignee": subject}, after, limit)
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
        async def read(conn: AsyncConnection) -> CardPage:
            facets = {} if assignee is None else {"assignee": assignee}
            equal = facets | ({} if status is None else {"status": status})
            page = await _cards(conn, scope, equal, after, limit)
            return CardPage(page.cards, page.next, await _status_counts(conn, scope, facets))

        return await self._store.query(read)

    async def region_metrics(
        self, scope: ScopeFilter, *, now: float, after: str | None, limit: int
    ) -> MetricsPage:
        return await self._store.query(lambda conn: _metrics(conn, scope, now, after, limit))

    async def work_order_refs(self, wo: str, forms_limit: int) -> WorkOrderRefs:
        return await self._store.query(lambda conn: _refs(conn, wo, forms_limit))

    async def open_work_orders(self, asset_id: str, limit: int) -> list[str]:
        async def read(conn: AsyncConnection) -> list[str]:
            cursor = await conn.execute(
                "SELECT doc FROM doc_index WHERE asset_id = %s AND type = 'wo'"
                " AND coalesce(status, '') NOT IN ('completed', 'closed', 'cancelled')"
                " ORDER BY created_seq DESC LIMIT %s",
                (asset_id, limit),
            )
            return [doc for (doc,) in await cursor.fetchall()]

        return await self._store.query(read)

    async def cursor_key(self) -> bytes:
        if self._key is None:

            async def read(conn: AsyncConnection) -> bytes:
                cursor = await conn.execute("SELECT value FROM meta WHERE key = 'cursor_key'")
                ((key,),) = await cursor.fetchall()
                return bytes(key)

            self._key = await self._store.query(read)
        return self._key


def _scope_sql(scope: ScopeFilter, params: dict[str, Any]) -> str:
    if scope.kind is ScopeKind.ALL:
        return "TRUE"
    if scope.kind is ScopeKind.NONE:
        return "FALSE"
    params["scope"] = scope.value
    return f"d.{scope.kind.value} = %(scope)s"


async def _cards(
    conn: AsyncConnection,
    scope: ScopeFilter,
    equal: dict[str, str],
    after: Position | None,
    limit: int,
) -> CardPage:
    params: dict[str, Any] = {"limit": limit + 1}
    where = ["d.type = 'wo'", _scope_sql(scope, params)]
    for column, value in equal.items():
        where.append(f"d.{column} = %({column})s")
        params[column] = value
    if after is not None:
        where.append(f"({_DUE_KEY}, d.doc) > (%(after_key)s, %(after_doc)s)")
        params["after_key"], params["after_doc"] = after
    cursor = await conn.execute(
        f"SELECT {_CARD_COLUMNS} FROM doc_index d {_ASSET_JOIN}"
        f" WHERE {' AND '.join(where)} ORDER BY {_DUE_KEY}, d.doc LIMIT %(limit)s",
        params,
    )
    rows = await cursor.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    cards = [Card(*row[:10]) for row in rows]
    return CardPage(cards, (rows[-1][10], rows[-1][0]) if more else None)


async def _status_counts(
    conn: AsyncConnection, scope: ScopeFilter, equal: dict[str, str]
) -> dict[str, int]:
    params: dict[str, Any] = {}
    where = ["d.type = 'wo'", _scope_sql(scope, params)]
    for column, value in equal.items():
        where.append(f"d.{column} = %({column})s")
        params[column] = value
    cursor = await conn.execute(
        f"SELECT coalesce(d.status, ''), count(*) FROM doc_index d WHERE {' AND '.join(where)}"
        " GROUP BY 1 ORDER BY 1",
        params,
    )
    return {status: count for status, count in await cursor.fetchall()}


async def _metrics(
    conn: AsyncConnection, scope: ScopeFilter, now: float, after: str | None, limit: int
) -> MetricsPage:
    params: dict[str, Any] = {"limit": limit + 1}
    params["today"], params["now"] = _due_cutoffs(now)
    # A team-less work order is grouped under '' (shown as null), which sorts first.
    where = ["d.type = 'wo'", _scope_sql(scope, params)]
    if after is not None:
        where.append("coalesce(d.team, '') > %(after)s")
        params["after"] = after
    cursor = await conn.execute(
        f"""SELECT coalesce(d.team, '') AS t,
            count(*),
            count(*) FILTER (WHERE coalesce(d.status, '') NOT IN {_ENDED}
                AND d.due_at IS NOT NULL
                AND CASE WHEN length(d.due_at) = 10 THEN d.due_at < %(today)s
                         ELSE d.due_at < %(now)s END),
            count(*) FILTER (WHERE coalesce(d.status, '') IN {_DONE}),
            -- Unknown times are left out.
            avg(CASE WHEN d.status IN {_DONE} THEN d.completed_at - d.created_at END),
            count(*) FILTER (WHERE coalesce(d.status, '') IN {_DONE} AND d.reopened = 0)
        FROM doc_index d WHERE {" AND ".join(where)}
        GROUP BY t ORDER BY t LIMIT %(limit)s""",
        params,
    )
    rows = await cursor.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        return MetricsPage([], None)
    teams = [row[0] for row in rows]
    by_status = await _by_team_and_status(conn, scope, teams)
    conflicts = await _conflicts_by_team(conn, scope, teams, now)
    result = [
        TeamMetrics(
            team=team or None,
            total=total,
            by_status=by_status.get(team, {}),
            overdue=overdue,
            completed=completed,
            mean_seconds_to_complete=None if mean is None else float(mean),
            first_time_fix_rate=(first / completed) if completed else None,
            conflicts_24h=conflicts.get(team, 0),
        )
        for team, total, overdue, completed, mean, first in rows
    ]
    return MetricsPage(result, teams[-1] if more else None)


async def _by_team_and_status(
    conn: AsyncConnection, scope: ScopeFilter, teams: list[str]
) -> dict[str, dict[str, int]]:
    params: dict[str, Any] = {"teams": teams}
    where = ["d.type = 'wo'", _scope_sql(scope, params), "coalesce(d.team, '') = ANY(%(teams)s)"]
    cursor = await conn.execute(
        f"""SELECT coalesce(d.team, ''), coalesce(d.status, ''), count(*) FROM doc_index d
        WHERE {" AND ".join(where)} GROUP BY 1, 2 ORDER BY 1, 2""",
        params,
    )
    counts: dict[str, dict[str, int]] = {}
    for team, status, count in await cursor.fetchall():
        counts.setdefault(team, {})[status] = count
    return counts


async def _conflicts_by_team(
    conn: AsyncConnection, scope: ScopeFilter, teams: list[str], now: float
) -> dict[str, int]:
    if scope.kind is ScopeKind.NONE:
        return {}
    params: dict[str, Any] = {"since": now - CONFLICTS_WINDOW, "teams": teams}
    where = ["c.at >= %(since)s", "coalesce(c.team, '') = ANY(%(teams)s)"]
    if scope.kind is not ScopeKind.ALL:
        where.append(f"c.{scope.kind.value} = %(scope)s")
        params["scope"] = scope.value
    cursor = await conn.execute(
        f"SELECT coalesce(c.team, ''), count(*) FROM conflicts c WHERE {' AND '.join(where)}"
        " GROUP BY 1",
        params,
    )
    return {team: count for team, count in await cursor.fetchall()}


async def _refs(conn: AsyncConnection, wo: str, forms_limit: int) -> WorkOrderRefs:
    cursor = await conn.execute(
        "SELECT doc FROM doc_index WHERE wo = %s AND type = 'form' ORDER BY doc LIMIT %s",
        (wo, forms_limit),
    )
    forms = [doc for (doc,) in await cursor.fetchall()]
    cursor = await conn.execute(
        """SELECT r.data FROM doc_index d
        JOIN ref_rows r ON r.dataset = 'assets' AND r.key = d.asset_id
        WHERE d.doc = %s""",
        (wo,),
    )
    row = await cursor.fetchone()
    asset = None
    if row is not None:
        value = orjson.loads(row[0])
        asset = value if isinstance(value, dict) else None
    return WorkOrderRefs(forms, asset)
