"""Maintenance that runs every so often for as long as the server does: reference data
compaction, upload expiry, room eviction. One task each, one error policy for all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Runs `work` every `interval` seconds in a task named `name`, from `start()` until `stop()`
    (or as an async context manager). The first run is one interval after the start, or at once
    with `at_start`.

    A run that raises is logged and the next one runs on schedule: maintenance that fails loses
    nothing but time (a log that grows, rooms kept a while longer), while a loop that died on
    its first error would stop maintaining for good without anyone noticing. `stop()` cancels a
    run in progress."""

    def __init__(
        self,
        name: str,
        interval: float,
        work: Callable[[], Awaitable[object]],
        *,
        at_start: bool = False,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.name = name
        self.interval = interval
        self._work = work
        self._at_start = at_start
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} is already running")
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> Periodic:
        self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        if not self._at_start:
            await asyncio.sleep(self.interval)
        while True:
            try:
                await self._work()
            except Exception:
                log.exception("%s failed; next run in %g s", self.name, self.interval)
            await asyncio.sleep(self.interval)
