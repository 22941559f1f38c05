"""Ctrl-C (and SIGTERM) for the demo: cancel the demo's task so that it shuts down in order
(devices, server, issuer) and says so, instead of a KeyboardInterrupt traceback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Interrupts:
    count: int = 0


@contextlib.contextmanager
def interrupts() -> Iterator[Interrupts]:
    """While inside, a first signal cancels the current task; later ones are only acknowledged
    (the shutdown already under way finishes)."""
    seen = Interrupts()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal() -> None:
        seen.count += 1
        if seen.count == 1 and task is not None:
            print("\nfieldsync demo: stopping…", flush=True)
            task.cancel()
        else:
            print("fieldsync demo: still stopping…", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or Windows: the default behaviour stays
    try:
        yield seen
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
