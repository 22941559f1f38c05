"""The one loop behind the server's maintenance: runs on schedule, survives a failed run, stops."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fieldsync.periodic import Periodic


async def test_a_failed_run_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []
    third = asyncio.Event()

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("the database is busy")
        if len(runs) == 3:
            third.set()

    async with Periodic("sweep", 0.001, work):
        await asyncio.wait_for(third.wait(), 5)
    assert runs[:3] == [0, 1, 2]
    (failure,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "sweep failed" in failure.getMessage()
    assert failure.exc_info is not None


async def test_stop_cancels_a_run_in_progress_and_nothing_runs_after() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        started.set()
        try:
            await asyncio.Event().wait()  # a run that would never end by itself
        except asyncio.CancelledError:
            cancelled.set()
            raise

    periodic = Periodic("slow", 0.001, work, at_start=True)
    periodic.start()
    await asyncio.wait_for(started.wait(), 5)
    await periodic.stop()
    assert cancelled.is_set()
    assert runs == 1
    await periodic.stop()  # stopping twice is harmless
    periodic.start()  # and it can start again
    await periodic.stop()


async def test_the_first_run_waits_an_interval_unless_asked_at_start() -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    async with Periodic("later", 3600, work):
        await asyncio.sleep(0)  # the task gets its first turn
        assert not ran.is_set()
    async with Periodic("now", 3600, work, at_start=True):
        await asyncio.wait_for(ran.wait(), 5)


def test_an_interval_must_be_positive() -> None:
    async def work() -> None:
        pass

    with pytest.raises(ValueError, match="interval must be positive"):
        Periodic("never", 0, work)
