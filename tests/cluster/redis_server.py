"""A redis-server of the test's own on a loopback port, to kill with SIGKILL and start again on
the same port: a real Redis restart (its subscriptions and unread messages gone), which the
machine's shared Redis, used by every other test, cannot be put through."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import redis.asyncio as redis

from tests.harness import free_port, unavailable


class RedisServer:
    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (again, on the same port) and return once it answers PING."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "redis.log"
        with log.open("ab") as output:
            self._process = await asyncio.create_subprocess_exec(
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                # Nothing kept on disk: a restart starts empty, as the machine's Redis does.
                *("--save", "", "--appendonly", "no", "--dir", str(self.folder)),
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                if self._process.returncode is not None:
                    raise RuntimeError(f"redis-server exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(redis.ConnectionError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")
        finally:
            await client.aclose()

    async def subscribers(self, channel: str) -> int:
        client = redis.Redis.from_url(self.url)
        try:
            counts = await client.pubsub_numsub(channel)
        finally:
            await client.aclose()
        return int(counts[0][1])

    async def kill(self) -> None:
        """SIGKILL: no shutdown, every connection cut."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self._process = None
