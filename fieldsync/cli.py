"""`fieldsync serve` runs the server; `fieldsync demo` runs it with a seeded realistic demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from fieldsync.adapters._reference_sql import ReferenceSqlConfig


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
    _add_reference_commands(commands)
    args = parser.parse_args(argv)

    if args.command == "settings":
        for s in SETTINGS:
            print(f"{s.env:34} {s.name:22} default {s.default!r:14} {s.help}")
        return 0
    if args.command == "reference":
        return _reference_import(args)
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


# --- fieldsync reference import ------------------------------------------------------------


def _add_reference_commands(commands: Any) -> None:
    reference = commands.add_parser("reference", help="reference data (assets, parts)")
    actions = reference.add_subparsers(dest="action", required=True)
    run = actions.add_parser(
        "import", help="import a reference_sql adapter's dataset now, with a progress bar"
    )
    run.add_argument("adapter", help="its name in the adapters file ([adapters.<name>])")
    run.add_argument("--full", action="store_true", help="every row; delete the rows it lacks")
    run.add_argument("--config", type=Path, help="TOML file (FIELDSYNC_* variables override it)")
    run.add_argument(
        "--adapters",
        type=Path,
        default=os.environ.get("FIELDSYNC_ADAPTERS") or None,
        help="the adapters file (default: FIELDSYNC_ADAPTERS)",
    )


def _reference_import(args: argparse.Namespace) -> int:
    """Run one import of a `reference_sql` adapter into the store of the data dir, the server
    running or not (SQLite serialises the two writers), showing rows/s and done/total."""
    from fieldsync.adapters import AdapterConfigError
    from fieldsync.adapters._reference_sql import KIND, ReferenceSqlConfig

    try:
        settings = Settings.load(args.config)
        if args.adapters is None:
            raise ConfigError("FIELDSYNC_ADAPTERS", "required: the adapters file (or --adapters)")
        try:
            tables = tomllib.loads(args.adapters.read_text()).get("adapters", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(str(args.adapters), str(exc)) from None
        table = tables.get(args.adapter) if isinstance(tables, dict) else None
        if not isinstance(table, dict) or table.get("kind") != KIND:
            raise AdapterConfigError(args.adapter, "kind", f"no {KIND} adapter of this name")
        config = ReferenceSqlConfig.from_table(args.adapter, table)
    except (ConfigError, AdapterConfigError) as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run_reference_import(settings, args.adapter, config, args.full))


async def _run_reference_import(
    settings: Settings, name: str, config: ReferenceSqlConfig, full: bool
) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fieldsync.adapters._reference_sql import ReferenceSql
    from fieldsync.storage import ImportResult, ReferenceData, SQLiteStore

    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(settings.data_path / "fieldsync.db")
    await store.open()
    reference = ReferenceData(store, chunk_rows=settings.reference_import_chunk)
    adapter = ReferenceSql(name, config, reference, settings.data_path / "adapters")
    console = Console(stderr=True)
    began = time.monotonic()
    try:
        total = await adapter.count(full=full)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10,.0f} rows/s"),
            console=console,
        ) as bar:
            task = bar.add_task(adapter.config.dataset, total=total, rate=0.0)

            def progress(result: ImportResult) -> None:
                elapsed = max(time.monotonic() - began, 1e-6)
                bar.update(task, completed=result.rows, rate=result.rows / elapsed)

            result = await adapter.import_rows(full=full, progress=progress)
    except Exception as exc:
        print(f"fieldsync: the import stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await adapter.stop()
        await store.close()
    print(
        f"{result.dataset}: {result.rows} rows read, {result.created} created,"
        f" {result.updated} updated, {result.deleted} deleted, {result.unchanged} unchanged"
        f" in {time.monotonic() - began:.1f} s (seq {result.seq})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
