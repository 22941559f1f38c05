"""A fieldsync server in a process of its own, for tests that measure it from outside (its
memory in `/proc/<pid>/status`). Settings come from `FIELDSYNC_*` in its environment; it listens
on any free loopback port, prints its URL once it does, and stops when its stdin closes."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from fieldsync.app import AccessLogger, create_app
from fieldsync.config import Settings


async def serve() -> None:
    runner = web.AppRunner(create_app(Settings.load()), access_log_class=AccessLogger)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
