"""Run fieldsync for the benchmarks: a loopback development issuer and the server, in this process.

    python bench/serve.py --data-dir .data/bench/fieldsync --port 12345 [--cprofile out.prof]

Prints one JSON line on stdout once serving: {"port", "pid", "token", "issuer", "data_dir"}, the
token being a long-lived admin token (the load generators put it in the y-websocket URL's
`token` query parameter, or in the v1 `Authorization` header). Serves until SIGTERM or SIGINT,
then shuts down cleanly (queued writes are committed, the store is closed).

The server is configured as in production except for the rate limit (raised so that a burst of
10,000 updates on one socket is measured, not refused), the cap on sockets per token subject
(every load client holds the one admin token) and the log level. The issuer generates
new keys at each start, so a restarted server prints a new token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from fieldsync import documents
from fieldsync.app import REPLICATOR, AccessLogger, configure_logging, create_app
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.config import Settings

ADMIN = DevUser("admin-subject", ("admin",), None, None, "Bench Admin")


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    issuer = DevIssuer({ADMIN.subject: ADMIN}, host="127.0.0.1")
    await issuer.start()
    settings = Settings.load(
        environ={},
        data_dir=str(args.data_dir),
        oidc_issuer=issuer.issuer,
        host="127.0.0.1",
        port=args.port,
        rate=1e6,
        burst=1e6,
        # Every load client holds the one admin token: S1 opens 400 sockets, S4 2,000.
        max_sockets_per_subject=100_000,
        log_level=args.log_level,
    )
    configure_logging(settings.log_level)
    app = create_app(settings)
    if args.no_rules:  # only to measure what the domain rules cost
        app[REPLICATOR].rules = documents.NO_RULES
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    token = issuer.issue(ADMIN.subject, ttl=86400)
    line = {
        "port": port,
        "pid": os.getpid(),
        "token": token,
        "issuer": issuer.issuer,
        "data_dir": str(args.data_dir),
    }
    print(json.dumps(line), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await issuer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--no-rules", action="store_true", help="the replicator without domain rules (their cost)"
    )
    parser.add_argument(
        "--cprofile", type=Path, default=None, help="profile the server, write pstats here on exit"
    )
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.cprofile is None:
        asyncio.run(serve(args))
        return 0
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(serve(args))
    finally:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
