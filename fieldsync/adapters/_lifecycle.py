"""The server's adapters as one resource: built from the adapters file at start, started and
stopped with the server (the outbox runner after them), their health in `/v1/ready` and their
figures in `/v1/metrics`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fieldsync.adapters._base import Adapter, OutboundAdapter
from fieldsync.adapters._config import AdapterContext, build_adapters
from fieldsync.adapters._runner import OutboxRunner
from fieldsync.storage import Store

__all__ = ["Adapters"]

_log = logging.getLogger(__name__)


class Adapters:
    def __init__(
        self, adapters: Sequence[Adapter], runner: OutboxRunner, *, source: str = ""
    ) -> None:
        self.adapters = list(adapters)
        self.runner = runner
        self.source = source

    @classmethod
    def load(
        cls,
        path: Path | None,
        context: AdapterContext,
        store: Store,
        *,
        retention_days: float = 7.0,
    ) -> Adapters:
        """The adapters of the file at `path` (none without one); raises `AdapterConfigError`
        naming the first bad adapter and key."""
        adapters = build_adapters(path, context) if path is not None else []
        outbound = [a for a in adapters if isinstance(a, OutboundAdapter)]
        runner = OutboxRunner(context.outbox, store, outbound, retention_days=retention_days)
        return cls(adapters, runner, source=str(path or ""))

    async def start(self) -> None:
        started: list[Adapter] = []
        try:
            for adapter in self.adapters:
                await adapter.start()
                started.append(adapter)
            await self.runner.start()
        except BaseException:
            for adapter in reversed(started):
                await adapter.stop()
            raise
        if self.adapters:
            _log.info(
                "adapters started: %s", ", ".join(f"{a.name} ({a.kind})" for a in self.adapters)
            )

    async def stop(self) -> None:
        """The runner first, letting its deliveries in flight finish, then each adapter."""
        await self.runner.stop()
        for adapter in reversed(self.adapters):
            try:
                await adapter.stop()
            except Exception:
                _log.exception("adapter %s did not stop cleanly", adapter.name)

    async def lifecycle(self, _app: object) -> AsyncIterator[None]:
        """An aiohttp cleanup context."""
        await self.start()
        yield
        await self.stop()

    def health(self) -> dict[str, dict[str, str]]:
        """Each adapter's state (`ok`, `degraded`, `down`) and detail, for `/v1/ready`."""
        result = {}
        for adapter in self.adapters:
            health = adapter.health()
            result[adapter.name] = {
                "kind": adapter.kind,
                "state": health.state.value,
                "detail": health.detail,
            }
        return result

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Per adapter: its own figures, and the outbox's for an outbound one."""
        outbox = await self.runner.metrics()
        return {
            adapter.name: {
                "kind": adapter.kind,
                **dict(adapter.metrics()),
                **({"outbox": outbox[adapter.name]} if adapter.name in outbox else {}),
            }
            for adapter in self.adapters
        }
