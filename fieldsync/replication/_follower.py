"""The feed follower of a cluster node: what other nodes commit reaches this node's sessions.

PostgreSQL's change feed is the truth and never skips (`Store.follow`); the follower reads it
after the last seq it processed, whenever another node's hint arrives, whenever the hints'
subscription is (re)established, and every `poll` seconds when no hint comes (Redis down, a
hint lost). From each page it rescopes this node's sessions for the work orders created or
moved elsewhere (the same `Replicator.rescope` a local commit runs) and marks the dashboards'
live views the changes may touch. After each local commit it publishes a hint for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from fieldsync.hints import Hint
from fieldsync.replication._replicator import Replicator
from fieldsync.replication._room import Room
from fieldsync.replication._views import Views
from fieldsync.storage import Committed, ScopeChange, Store

__all__ = ["Follower", "Hints"]

log = logging.getLogger(__name__)


class Hints(Protocol):
    """Commit hints between nodes (`fieldsync.hints.RedisHints`)."""

    async def start(self, heard: Callable[[Hint | None], None]) -> None:
        """Call `heard(hint)` for each hint of another node, and `heard(None)` whenever hints
        may have been missed (the subscription was established again)."""
        ...

    async def stop(self) -> None: ...

    def publish(self, hint: Hint) -> None:
        """Send a hint of this node's commit; never suspends, never raises."""
        ...


class Follower:
    def __init__(
        self,
        store: Store,
        replicator: Replicator,
        views: Views | None = None,
        hints: Hints | None = None,
        *,
        poll: float = 2.0,
        page: int = 500,
        spacing: float = 0.05,
    ) -> None:
        self._store = store
        self._replicator = replicator
        self._views = views
        self._hints = hints
        self._poll = poll
        self._page = page
        # Reads of the feed start at most this often: under load every other node's every
        # batch hints, and one read covers all the batches committed since the last one.
        self._spacing = spacing
        self.seq = 0  # every change up to here is processed
        self._mine: set[int] = set()  # seqs of this node's scope changes, already rescoped
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # feed pages read, for the tests and the metrics

    async def start(self) -> None:
        self._replicator.commit_hooks.append(self._committed)
        self.seq = await self._store.head()
        self._task = asyncio.create_task(self._run(), name="fieldsync-feed-follower")
        if self._hints is not None:
            await self._hints.start(self._heard)

    async def stop(self) -> None:
        if self._hints is not None:
            await self._hints.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(ValueError):
            self._replicator.commit_hooks.remove(self._committed)

    def _committed(self, room: Room, committed: Committed) -> None:
        """The write path's hook: this node's commit. Its scope change is rescoped here already;
        the other nodes hear of it."""
        moved = committed.scope_change is not None
        if moved and committed.seq > self.seq:
            self._mine.add(committed.seq)
        if self._hints is not None:
            self._hints.publish(Hint(room.doc_id, committed.seq, moved))

    def _heard(self, hint: Hint | None) -> None:
        if hint is None or hint.seq > self.seq:
            self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
            self._wake.clear()
            try:
                await self.catch_up()
            except Exception as exc:  # the database is away: try again, spaced out
                if failures == 0:
                    log.warning("following the change feed failed: %r; retrying", exc)
                failures += 1
                await asyncio.sleep(random.uniform(0, min(10.0, 0.2 * 2**failures)))
                self._wake.set()
                continue
            if failures:
                log.info("following the change feed again from seq %d", self.seq)
            failures = 0
            await asyncio.sleep(self._spacing)

    def _net(self, changes: list[tuple[int, ScopeChange]]) -> list[ScopeChange]:
        """Other nodes' moves of a document in a row, as one, from the first `before` to the
        last `after`: a work order created and moved again before this read was never in
        between for this node's sessions (telling them both would add it, then take it away).
        This node's own moves were rescoped as they committed; one ends a row."""
        net: list[ScopeChange] = []
        rows: dict[str, int] = {}  # document -> its open row in `net`
        for seq, change in changes:
            if seq in self._mine:
                rows.pop(change.doc, None)
            elif (row := rows.get(change.doc)) is not None:
                net[row] = replace(change, before=net[row].before)
            else:
                rows[change.doc] = len(net)
                net.append(change)
        return net

    async def catch_up(self) -> None:
        """Process every change committed after `seq`, page by page."""
        while True:
            page = await self._store.follow(self.seq, self._page)
            self.reads += 1
            for change in self._net(page.scope_changes):
                self._replicator.rescope(change)
            if self._views is not None:
                befores = [change.before for _, change in page.scope_changes]
                self._views.changed([*page.changed, *befores])
            self.seq = max(self.seq, page.upto)
            self._mine = {seq for seq in self._mine if seq > self.seq}
            if not page.more:
                return
