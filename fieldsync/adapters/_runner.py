"""The outbox runner: takes the committed changes the store wrote to the outbox to each outbound
adapter, at least once, per document in order, without any user action (DESIGN.md §7).

Per adapter, one loop: it asks the outbox for the documents whose pending entries are all due,
delivers each one's latest state (pending changes of a document coalesce into one delivery),
and records the outcome. A failure is retried with capped exponential backoff and jitter, not
before the target's `Retry-After`; after `max_attempts`, or at once for a refusal that no retry
can change, the document's entries are dead-lettered and only that document waits for an
operator while every other keeps flowing. One loop per adapter, so a slow target never delays
another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc

from fieldsync import documents
from fieldsync.adapters._base import Delivery, DeliveryError, OutboundAdapter
from fieldsync.storage import DueDoc, Outbox, OutboxError, Store, StoredDoc

__all__ = ["Backoff", "OutboxRunner"]

_log = logging.getLogger(__name__)

Clock = Callable[[], float]

_PURGE_EVERY = 3600.0  # seconds
_ERROR_TEXT = 500  # characters of an unexpected error's message kept in its entry


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with equal jitter: the n-th failure waits between half and
    all of `min(cap, base * 2**(n-1))` seconds, so many documents failing together do not
    come back together (AWS Architecture Blog, "Exponential Backoff And Jitter")."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, failures: int, retry_after: float | None, draw: float) -> float:
        """Seconds before the next attempt after `failures` failures; `draw` is in [0, 1)."""
        ceiling: float = min(self.cap, self.base * 2 ** min(failures - 1, 62))
        delay = ceiling * (0.5 + draw / 2)
        # The target's Retry-After is a floor (RFC 9110 §10.2.3): never earlier than it asked.
        return max(delay, retry_after) if retry_after is not None else delay


@dataclass
class _Counters:
    delivered: int = 0  # deliveries that took effect
    attempts: int = 0  # deliveries tried
    failures: int = 0  # attempts that failed (retried or dead-lettered)
    dead_lettered: int = 0  # documents set aside for an operator


class OutboxRunner:
    """Delivers the outbox to `adapters`. `clock` and `draw` (jitter) are injectable so that
    tests drive time through `deliver_due` without sleeping; `start` runs the loops."""

    def __init__(
        self,
        outbox: Outbox,
        store: Store,
        adapters: Iterable[OutboundAdapter],
        *,
        clock: Clock = time.time,
        draw: Callable[[], float] = random.random,
        backoff: Backoff | None = None,
        batch: int = 50,
        concurrency: int = 4,
        poll: float = 5.0,
        retention_days: float = 7.0,
    ) -> None:
        self._outbox = outbox
        self._store = store
        self.adapters = {adapter.name: adapter for adapter in adapters}
        self._clock = clock
        self._draw = draw
        self._backoff = backoff or Backoff()
        self._batch = batch
        self._concurrency = concurrency
        # Entries made by another process (the CLI's retry, replay) are seen within this.
        self._poll = poll
        self._retention = retention_days * 86_400
        self._counters = {name: _Counters() for name in self.adapters}
        self._wakes = {name: asyncio.Event() for name in self.adapters}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def routes(self) -> dict[str, list[str]]:
        """Document type -> the adapters that receive its changes."""
        routes: dict[str, list[str]] = {}
        for name, adapter in self.adapters.items():
            for doc_type in sorted(adapter.doc_types):
                routes.setdefault(doc_type, []).append(name)
        return routes

    def subscribe(self) -> None:
        """Tell the store which changes to write entries for (before the first write the
        adapters must see)."""
        self._outbox.route(self.routes, self.wake)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.subscribe()
        self._stopping = False
        self._stopped.clear()
        self._tasks = [
            asyncio.create_task(self._run(name), name=f"outbox-{name}") for name in self.adapters
        ]
        if self.adapters:
            self._tasks.append(asyncio.create_task(self._purge_forever(), name="outbox-purge"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, and let the deliveries in flight finish (at most `timeout`
        seconds, then they are cancelled: their entries stay pending, delivered again later)."""
        self._stopping = True
        self._stopped.set()
        self.wake()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Something changed in the outbox (a commit wrote entries, an operator retried)."""
        for event in self._wakes.values():
            event.set()

    async def _purge_forever(self) -> None:
        while not self._stopping:
            try:
                await self.purge()
            except Exception:
                _log.exception("outbox: purging delivered entries failed; trying again later")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), _PURGE_EVERY)

    async def _run(self, name: str) -> None:
        wake = self._wakes[name]
        while not self._stopping:
            wake.clear()
            try:
                done = await self.deliver_due(name)
                if done:
                    continue
                timeout = self._poll
                next_due = await self._outbox.next_due(name)
                if next_due is not None:
                    timeout = min(timeout, max(next_due - self._clock(), 0.0))
            except Exception:
                _log.exception("outbox %s: a pass failed; trying again", name)
                timeout = self._poll
            if timeout > 0 and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)

    # --- one pass ----------------------------------------------------------------------------

    async def deliver_due(self, name: str | None = None) -> int:
        """Deliver what is due now for one adapter (all when None): one pass; the count of
        documents tried."""
        names = [name] if name is not None else list(self.adapters)
        counts = await asyncio.gather(*(self._pass(n) for n in names))
        return sum(counts)

    async def _pass(self, name: str) -> int:
        due = await self._outbox.due(name, self._clock(), self._batch)
        if not due:
            return 0
        limit = asyncio.Semaphore(self._concurrency)

        async def one(entry: DueDoc) -> None:
            async with limit:
                await self._deliver(self.adapters[name], entry)

        await asyncio.gather(*(one(entry) for entry in due))
        return len(due)

    async def _deliver(self, adapter: OutboundAdapter, due: DueDoc) -> None:
        counters = self._counters[adapter.name]
        stored = await self._store.load(due.doc)
        if stored is None:  # an entry is only written with its document: a damaged database
            error = OutboxError("missing_document", "the document is not in the store")
            await self._outbox.dead_letter(
                adapter.name, due.doc, due.last_seq, error, self._clock()
            )
            counters.dead_lettered += 1
            return
        document = await asyncio.to_thread(_project, due.doc, stored)
        # The state as of its latest seq: every pending entry up to it is in this delivery.
        delivery = Delivery(adapter.name, due.doc, stored.seq, document, due.attempts + 1)
        counters.attempts += 1
        try:
            await adapter.deliver(delivery)
        except DeliveryError as exc:
            await self._failed(adapter, due, stored.seq, exc)
            return
        except Exception as exc:
            # A bug or an unexpected failure of the adapter: retried like a transient error,
            # and kept in the entry for the operator.
            _log.exception("outbox %s: delivering %s failed", adapter.name, due.doc)
            message = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT]
            await self._failed(adapter, due, stored.seq, DeliveryError("adapter_error", message))
            return
        await self._outbox.delivered(adapter.name, due.doc, stored.seq, self._clock())
        counters.delivered += 1

    async def _failed(
        self, adapter: OutboundAdapter, due: DueDoc, seq: int, exc: DeliveryError
    ) -> None:
        counters = self._counters[adapter.name]
        counters.failures += 1
        error = OutboxError(exc.code, exc.message, exc.entity)
        now = self._clock()
        failures = due.attempts + 1
        if not exc.retryable or failures >= adapter.max_attempts:
            await self._outbox.dead_letter(adapter.name, due.doc, seq, error, now)
            counters.dead_lettered += 1
            _log.warning(
                "outbox %s: %s dead-lettered after %d attempts: %s",
                adapter.name,
                due.doc,
                failures,
                exc.code,
            )
            return
        delay = self._backoff.delay(failures, exc.retry_after, self._draw())
        await self._outbox.failed(adapter.name, due.doc, seq, error, now + delay, now)

    # --- what operators read -----------------------------------------------------------------

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Per adapter: pending entries, the oldest one's age (its lag, seconds), dead
        letters, and this process's counters."""
        stats = await self._outbox.stats()
        now = self._clock()
        result: dict[str, dict[str, Any]] = {}
        for name, counters in self._counters.items():
            stat = stats.get(name)
            oldest = stat.oldest_pending_at if stat else None
            result[name] = {
                "pending": stat.pending if stat else 0,
                "dead": stat.dead if stat else 0,
                "lag_seconds": round(max(now - oldest, 0.0), 3) if oldest is not None else 0.0,
                "attempts": counters.attempts,
                "failures": counters.failures,
                "delivered": counters.delivered,
                "dead_lettered": counters.dead_lettered,
            }
        return result

    async def purge(self) -> int:
        """Drop delivered and skipped entries older than the retention period."""
        return await self._outbox.purge(self._clock() - self._retention)


def _project(doc_id: str, stored: StoredDoc) -> Mapping[str, Any]:
    """The document's JSON as of its last stored change (in a worker thread: replaying a log
    is CPU work)."""
    doc: Doc[Any] = Doc()
    for data in ([stored.snapshot] if stored.snapshot else []) + stored.updates:
        doc.apply_update(data)
    return documents.to_json(doc_id, doc)
