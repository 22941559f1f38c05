"""Live views for dashboards over `/v1/sync`: `subscribe {view, params}` answers `view {view,
rows}`, then `view_changes {view, added, changed, removed}` as committed updates touch it.

A view is computed on the server, from the index and SQL (the storage Protocols' queries: the
screens' team queue and region metrics, the conflict log, the devices), never from rows a browser
adds up. Subscribers that ask the same view of the same scope with the same parameters share one
`Feed`: one query per change serves every dashboard of a team. The write path calls `committed`
after every commit (`Replicator.commit_hooks`); a feed the commit may touch is marked dirty and
recomputed at most once per `interval`, its rows compared with those last sent, and only the
difference goes out (coalesced: one message per view per interval, however many commits).

The scope is the policy's, read again for every subscriber on every recomputation: a reassignment
out of a supervisor's team drops the row from that team's feed at its next recomputation, and a
policy reloaded with another scope moves the subscriber to the feed of its new scope.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from fieldsync.auth import Policy, Principal, Role, in_scope, required_version
from fieldsync.documents import DocType
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.periodic import Periodic
from fieldsync.records import DocIndex, ScopeFilter, ScopeKind
from fieldsync.replication._room import Room
from fieldsync.storage import Card, Committed, ConflictRecord, DeviceRecord, Screens, Store

log = logging.getLogger(__name__)

__all__ = ["View", "Views"]


class View(StrEnum):
    TEAM_QUEUE = "team-queue"
    REGION_METRICS = "region-metrics"
    CONFLICTS = "conflicts"
    DEVICES = "devices"


# Views show many work orders, conflicts and devices at once: for the roles that oversee others.
# What each of them sees within a view is its policy scope (a manager's team queue is its region).
VIEW_ROLES = frozenset({Role.SUPERVISOR, Role.MANAGER, Role.ADMIN})
_DONE = ("completed", "closed")
_ENDED = (*_DONE, "cancelled")
# Rows a view holds at most, by default and at most when `params.limit` asks.
_LIMITS = {
    View.TEAM_QUEUE: (200, 500),
    View.REGION_METRICS: (200, 200),
    View.CONFLICTS: (50, 200),
    View.DEVICES: (200, 500),
}
_MAX_FILTER = 200

Row = dict[str, Any]


class Subscriber(Protocol):
    """A `fieldsync.v1` session, as far as the views need it."""

    principal: Principal

    @property
    def closed(self) -> object | None: ...

    def send_control(self, body: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Query:
    """What a feed computes: one view, of one scope, with its parameters (sorted pairs)."""

    view: View
    scope: ScopeFilter
    params: tuple[tuple[str, Any], ...]

    def param(self, name: str) -> Any:
        return dict(self.params).get(name)


@dataclass(eq=False)
class Feed:
    query: Query
    rows: dict[str, Row] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # `counts`, `truncated`
    subscribers: dict[Subscriber, None] = field(default_factory=dict)
    ready: asyncio.Future[None] | None = None
    dirty: bool = False
    flushing: bool = False
    scheduled: asyncio.TimerHandle | None = None
    last_flush: float = 0.0


def parse_params(view: View, params: object) -> tuple[tuple[str, Any], ...]:
    """The parameters of `view` a subscription gives, checked and with defaults; raises
    `invalid_request`. Members a view does not take are ignored, as in every control message."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, "params must be an object")
    default, maximum = _LIMITS[view]
    limit = params.get("limit", default)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= maximum:
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"limit must be 1 to {maximum}")
    taken: dict[str, Any] = {"limit": limit}
    if view is View.TEAM_QUEUE:
        for name in ("status", "assignee"):
            value = params.get(name)
            if value is not None and (
                not isinstance(value, str) or not 0 < len(value) <= _MAX_FILTER
            ):
                raise FieldsyncError(
                    ErrorCode.INVALID_REQUEST, f"{name} must be 1 to {_MAX_FILTER} characters"
                )
            taken[name] = value
    return tuple(sorted(taken.items()))


class Views:
    """The live views of every session of this node. `committed` is the write path's hook;
    `control` handles a session's `subscribe` and `unsubscribe`; `leave` forgets a session."""

    def __init__(
        self,
        store: Store,
        screens: Screens,
        policy: Callable[[], Policy],
        *,
        min_versions: Mapping[str, str] | None = None,
        online: Callable[[], set[str]] | None = None,
        interval: float = 0.1,
        devices_interval: float = 1.0,
        refresh: float = 5.0,
    ) -> None:
        self._store = store
        self._screens = screens
        self._policy = policy
        self._min_versions = dict(min_versions or {})
        self._online = online or set
        # The coalescing window: a view changes at most once per interval. Devices' lag moves
        # with every commit anywhere, so their view settles for longer.
        self._interval = {view: interval for view in View} | {View.DEVICES: devices_interval}
        self._feeds: dict[Query, Feed] = {}
        self._subscriptions: dict[Subscriber, dict[View, Feed]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Time alone changes what a commit does not: overdue work orders, devices that connect.
        self._refresher = Periodic("views-refresh", refresh, self._refresh)

    async def start(self) -> None:
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()
        for feed in self._feeds.values():
            if feed.scheduled is not None:
                feed.scheduled.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def feeds(self) -> int:
        return len(self._feeds)

    # --- the session's side -------------------------------------------------------------

    async def control(self, session: Subscriber, body: Mapping[str, Any]) -> None:
        """A `subscribe` or `unsubscribe` control message; a refused one is answered with
        `error {code, message, view}` and changes nothing."""
        name = body.get("view")
        try:
            view = View(name) if isinstance(name, str) else None
        except ValueError:
            view = None
        try:
            if view is None:
                names = ", ".join(v.value for v in View)
                raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"view must be one of {names}")
            if body.get("type") == "unsubscribe":
                self._unsubscribe(session, view)
            else:
                await self._subscribe(session, view, parse_params(view, body.get("params")))
        except FieldsyncError as exc:
            error: dict[str, Any] = {"type": "error", "code": exc.code.value}
            error["message"] = exc.message
            if view is not None:
                error["view"] = view.value
            session.send_control(error)

    def leave(self, session: Subscriber) -> None:
        for view in list(self._subscriptions.get(session, {})):
            self._unsubscribe(session, view)

    def _scope(self, principal: Principal) -> ScopeFilter:
        if not principal.roles & VIEW_ROLES:
            raise FieldsyncError(
                ErrorCode.FORBIDDEN, "views are for supervisors, managers and admins"
            )
        scope = self._policy().scope(principal)
        if scope.kind is ScopeKind.NONE:
            raise FieldsyncError(ErrorCode.FORBIDDEN, "your role sees no documents")
        return scope

    async def _subscribe(
        self, session: Subscriber, view: View, params: tuple[tuple[str, Any], ...]
    ) -> None:
        query = Query(view, self._scope(session.principal), params)
        self._unsubscribe(session, view)
        feed = self._feeds.get(query)
        if feed is None:
            feed = self._feeds[query] = Feed(query)
            feed.ready = asyncio.ensure_future(self._flush(feed, first=True))
        assert feed.ready is not None
        try:
            await asyncio.shield(feed.ready)
        except Exception:
            self._forget_if_unused(feed)
            raise FieldsyncError(
                ErrorCode.STORAGE_UNAVAILABLE, f"{view.value} could not be read; subscribe again"
            ) from None
        if session.closed is not None or self._feeds.get(query) is not feed:
            return
        self._unsubscribe(session, view)  # another subscribe may have finished meanwhile
        feed.subscribers[session] = None
        self._subscriptions.setdefault(session, {})[view] = feed
        rows = list(feed.rows.values())
        session.send_control({"type": "view", "view": view.value, "rows": rows, **feed.extra})

    def _unsubscribe(self, session: Subscriber, view: View) -> None:
        mine = self._subscriptions.get(session)
        feed = mine.pop(view, None) if mine is not None else None
        if mine is not None and not mine:
            del self._subscriptions[session]
        if feed is not None:
            feed.subscribers.pop(session, None)
            self._forget_if_unused(feed)

    def _forget_if_unused(self, feed: Feed) -> None:
        if feed.subscribers or (feed.ready is not None and not feed.ready.done()):
            return
        if self._feeds.get(feed.query) is feed:
            del self._feeds[feed.query]
        if feed.scheduled is not None:
            feed.scheduled.cancel()
            feed.scheduled = None

    # --- the write path's side ----------------------------------------------------------

    def committed(self, room: Room, committed: Committed) -> None:
        """A commit of `room`: mark the feeds it may change. A work order is in a feed's scope
        after the commit, or was before it (a reassignment out of the scope removes its row)."""
        if room.type is not DocType.WORK_ORDER:
            self.changed([])
            return
        before = committed.scope_change.before if committed.scope_change else None
        self.changed([room.index, before])

    def changed(self, work_orders: Iterable[DocIndex | None]) -> None:
        """Commits (this node's, or others' read from the feed) changed work orders whose rows,
        before or after, are `work_orders`: mark the feeds they may change."""
        if not self._feeds:
            return
        rows = [row for row in work_orders if row is not None]
        for feed in list(self._feeds.values()):
            if feed.query.view is View.DEVICES:
                self._mark(feed)  # every commit moves the server's seq, and so the lag
            elif any(in_scope(feed.query.scope, row) for row in rows):
                self._mark(feed)

    async def _refresh(self) -> None:
        for feed in list(self._feeds.values()):
            self._mark(feed)

    def _mark(self, feed: Feed) -> None:
        feed.dirty = True
        self._schedule(feed)

    def _schedule(self, feed: Feed) -> None:
        if feed.scheduled is not None or feed.flushing or not feed.dirty:
            return
        if self._feeds.get(feed.query) is not feed:
            return
        interval = self._interval[feed.query.view]
        delay = max(0.0, feed.last_flush + interval - time.monotonic())
        feed.scheduled = asyncio.get_running_loop().call_later(delay, self._run, feed)

    def _run(self, feed: Feed) -> None:
        feed.scheduled = None
        task = asyncio.create_task(self._flush(feed))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a view failed to refresh: %r", task.exception())

    async def _flush(self, feed: Feed, *, first: bool = False) -> None:
        """Recompute `feed` and send what changed to its subscribers (on the first run, only
        keep the rows: `_subscribe` sends them whole)."""
        feed.flushing = True
        feed.dirty = False
        try:
            self._check_subscribers(feed)
            rows, extra = await self._compute(feed.query)
            if not first:
                self._send_changes(feed, rows, extra)
            feed.rows, feed.extra = rows, extra
        finally:
            feed.flushing = False
            feed.last_flush = time.monotonic()
            self._schedule(feed)

    def _check_subscribers(self, feed: Feed) -> None:
        """Every subscriber still has this view's scope under the policy in force; one that no
        longer does leaves the feed at once and subscribes again in its new scope."""
        for session in list(feed.subscribers):
            try:
                scope = self._scope(session.principal)
            except FieldsyncError:
                scope = None
            if scope == feed.query.scope:
                continue
            self._unsubscribe(session, feed.query.view)
            if scope is not None and session.closed is None:
                task = asyncio.create_task(
                    self.control(
                        session,
                        {
                            "type": "subscribe",
                            "view": feed.query.view.value,
                            "params": dict(feed.query.params),
                        },
                    )
                )
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _send_changes(self, feed: Feed, rows: dict[str, Row], extra: dict[str, Any]) -> None:
        old = feed.rows
        added = [row for key, row in rows.items() if key not in old]
        changed = [row for key, row in rows.items() if key in old and old[key] != row]
        removed = [key for key in old if key not in rows]
        if not (added or changed or removed) and extra == feed.extra:
            return
        message = {
            "type": "view_changes",
            "view": feed.query.view.value,
            "added": added,
            "changed": changed,
            "removed": removed,
            **extra,
        }
        for session in feed.subscribers:
            session.send_control(message)

    # --- the views ----------------------------------------------------------------------

    async def _compute(self, query: Query) -> tuple[dict[str, Row], dict[str, Any]]:
        compute: dict[View, Callable[[Query], Awaitable[tuple[dict[str, Row], dict[str, Any]]]]]
        compute = {
            View.TEAM_QUEUE: self._team_queue,
            View.REGION_METRICS: self._region_metrics,
            View.CONFLICTS: self._conflicts,
            View.DEVICES: self._devices,
        }
        return await compute[query.view](query)

    async def _team_queue(self, query: Query) -> tuple[dict[str, Row], dict[str, Any]]:
        page = await self._screens.team_queue(
            query.scope,
            status=query.param("status"),
            assignee=query.param("assignee"),
            after=None,
            limit=query.param("limit"),
        )
        now = time.time()
        rows = {card.id: _card(card, now) for card in page.cards}
        return rows, {"counts": page.counts or {}, "truncated": page.next is not None}

    async def _region_metrics(self, query: Query) -> tuple[dict[str, Row], dict[str, Any]]:
        page = await self._screens.region_metrics(
            query.scope, now=time.time(), after=None, limit=query.param("limit")
        )
        rows = {team.team or "": {"id": team.team or "", **asdict(team)} for team in page.teams}
        return rows, {"truncated": page.next is not None}

    async def _conflicts(self, query: Query) -> tuple[dict[str, Row], dict[str, Any]]:
        records = await self._store.conflicts(query.scope, None, query.param("limit"))
        return {str(record.id): _conflict(record) for record in records}, {}

    async def _devices(self, query: Query) -> tuple[dict[str, Row], dict[str, Any]]:
        head = await self._store.head()
        devices = await self._store.devices_in(query.scope, query.param("limit"))
        online = self._online()
        rows = {d.device_id: self._device(d, head, online) for d in devices}
        return rows, {"server_seq": head}

    def _device(self, device: DeviceRecord, head: int, online: set[str]) -> Row:
        platform, version = device.platform or "", device.version or ""
        minimum = required_version(self._min_versions, platform, version)
        return {
            "id": device.device_id,
            "device_id": device.device_id,
            "subject": device.subject,
            "team": device.team,
            "platform": platform,
            "version": version,
            "last_seen": device.last_seen,
            "since": device.last_seq,
            "lag": max(0, head - device.last_seq),
            "below_min_version": minimum is not None,
            "min_version": minimum,
            "online": device.device_id in online,
        }


def _card(card: Card, now: float) -> Row:
    return {
        "id": card.id,
        "number": card.number,
        "title": card.title,
        "status": card.status,
        "priority": card.priority,
        "due_at": card.due_at,
        "site": card.site,
        "asset_id": card.asset_id,
        "asset_name": card.asset_name,
        "assignee": card.assignee,
        "overdue": overdue(card.status, card.due_at, now),
    }


def overdue(status: str | None, due_at: str | None, now: float) -> bool:
    """Due before `now` and not completed, closed or cancelled; a date without a time is due at
    the end of that day, UTC (the region metrics' definition, `Screens.region_metrics`)."""
    if due_at is None or (status or "") in _ENDED:
        return False
    moment = datetime.fromtimestamp(now, UTC)
    if len(due_at) == 10:
        return due_at < moment.strftime("%Y-%m-%d")
    return due_at < moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _conflict(record: ConflictRecord) -> Row:
    conflict = record.conflict
    return {
        "id": str(record.id),
        "seq": record.seq,
        "at": record.at,
        "doc": conflict.doc,
        "rule": conflict.rule,
        "detail": conflict.detail,
        "actor": conflict.actor,
        "origin": str(conflict.origin),
        "team": conflict.team,
        "assignee": conflict.assignee,
    }
