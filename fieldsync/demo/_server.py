"""The demo's two servers in this process: a development OpenID issuer and fieldsync itself, both
on loopback, fieldsync on SQLite in the demo's data folder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from fieldsync.adapters import Adapter
from fieldsync.app import ADAPTERS, BACKEND, REPLICATOR, STORE, AccessLogger, create_app
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.config import Settings
from fieldsync.demo import _adapters
from fieldsync.replication import Replicator
from fieldsync.storage import Backend, Store

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Running:
    url: str
    issuer: DevIssuer
    app: web.Application
    runner: web.AppRunner
    data_dir: Path

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout`) until no HTTP connection is open: each has been logged."""
        server = self.runner.server
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while server is not None and server.connections:  # noqa: ASYNC110 (no event)
                    await asyncio.sleep(0.01)

    @property
    def sync_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/v1/sync"

    @property
    def backend(self) -> Backend:
        return self.app[BACKEND]

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def replicator(self) -> Replicator:
        return self.app[REPLICATOR]

    @property
    def adapters(self) -> Sequence[Adapter]:
        return self.app[ADAPTERS].adapters


@asynccontextmanager
async def running(
    data_dir: Path, port: int, users: Mapping[str, DevUser], sections: str = ""
) -> AsyncIterator[Running]:
    """The issuer, then the server (which fetches the issuer's keys as it starts), with the
    demo's ERP adapter and those of `sections` (the plant floor's, the directory's)."""
    adapters = await asyncio.to_thread(_adapters.adapters_file, data_dir, sections)
    async with DevIssuer(users, host=HOST) as issuer:
        settings = Settings.load(
            environ={},
            data_dir=str(data_dir),
            oidc_issuer=issuer.issuer,
            host=HOST,
            port=port,
            adapters=str(adapters),
        )
        app = create_app(settings)
        runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=2)
        await runner.setup()
        try:
            await web.TCPSite(runner, HOST, port).start()
            bound = runner.addresses[0][1]
            yield Running(f"http://{HOST}:{bound}", issuer, app, runner, data_dir)
        finally:
            await runner.cleanup()


class QuietLog:
    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.level = logger.level

    def restore(self) -> None:
        self.logger.setLevel(self.level)


@contextlib.contextmanager
def quiet_access_log() -> Iterator[QuietLog]:
    """Hide the access log (simulated devices connect hundreds of times) until `restore()` or
    the end of the block."""
    quiet = QuietLog(logging.getLogger("aiohttp.access"))
    quiet.logger.setLevel(logging.WARNING)
    try:
        yield quiet
    finally:
        quiet.restore()
