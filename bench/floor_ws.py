"""The floor under S4: a bare aiohttp WebSocket server that does the least a y-websocket server
must (answer a client's sync step 1 with an empty step 2) and holds nothing else per connection.

    python bench/floor_ws.py --port 12345     # then ysync_load.py --scenario s4 --url ws://127.0.0.1:12345/{doc}

Its RSS per idle connection is what aiohttp + asyncio cost before fieldsync adds anything, on the
same Python and the same load generator (bench/README.md, S4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

from aiohttp import WSMsgType, web

EMPTY_STEP2 = bytes((0, 1, 2, 0, 0))  # sync, step 2, varbytes(empty update b"\x00\x00")


async def handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0, compress=False)
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.BINARY and message.data[:2] == b"\x00\x00":
            await ws.send_bytes(EMPTY_STEP2)
    return ws


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/{doc}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=12345)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
