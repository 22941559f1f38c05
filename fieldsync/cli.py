"""`fieldsync serve` runs the server; `fieldsync demo` runs it with a seeded realistic demo."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web

from fieldsync.app import (
    AccessLogger,
    configure_logging,
    create_app,
    load_policy,
    load_templates,
    reload_policy,
)
from fieldsync.auth import PolicyError
from fieldsync.config import SETTINGS, ConfigError, Settings
from fieldsync.documents import TemplateError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fieldsync", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, help="TOML file (FIELDSYNC_* variables override it)")
    demo = commands.add_parser("demo", help="run the server with a dev issuer and a seeded demo")
    demo.add_argument("--data-dir", type=Path, default=Path(".data/demo"))
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--work-orders", type=int, default=300)
    demo.add_argument("--devices", type=int, default=15)
    demo.add_argument("--rounds", type=int, default=3, help="offline/online rounds of the devices")
    demo.add_argument("--exit", action="store_true", help="stop after the summary")
    commands.add_parser("settings", help="list every setting with its variable and default")
    args = parser.parse_args(argv)

    if args.command == "settings":
        for s in SETTINGS:
            print(f"{s.env:34} {s.name:22} default {s.default!r:14} {s.help}")
        return 0
    if args.command == "demo":
        from fieldsync.demo import run_demo

        return asyncio.run(
            run_demo(
                data_dir=args.data_dir,
                port=args.port,
                work_orders=args.work_orders,
                devices=args.devices,
                rounds=args.rounds,
                stay=not args.exit,
            )
        )
    try:
        settings = Settings.load(args.config)
        load_policy(settings)  # a broken policy or template stops the server here, named
        load_templates(settings)
        if not settings.oidc_issuer:
            raise ConfigError("FIELDSYNC_OIDC_ISSUER", "required: the URL of your OpenID provider")
    except (ConfigError, PolicyError, TemplateError) as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    app = create_app(settings)

    async def reload_on_sighup(app: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy, app)

    app.on_startup.append(reload_on_sighup)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log_class=AccessLogger,
        print=lambda text: print(text, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
