"""`fieldsync serve` runs the server; `fieldsync demo` runs it with a seeded realistic demo;
`fieldsync outbox` lets an operator read and act on the outbox, and `fieldsync reference import`
runs a reference_sql adapter's import now (both with the server running or not);
`fieldsync backup` copies the data folder while the server runs, `fieldsync restore` puts a
backup back while it is stopped; `fieldsync doc`, `devices` and `sessions` are the operators'
look into documents, devices and who is connected (`fieldsync.admin`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from fieldsync import admin
from fieldsync.adapters import (
    AdapterConfigError,
    AdapterContext,
    ReferenceImporter,
    Table,
    build_adapter,
    read_file,
)
from fieldsync.api import entry_json
from fieldsync.app import (
    AccessLogger,
    backend_for,
    configure_logging,
    create_app,
    load_policy,
    load_templates,
    reload_policy,
)
from fieldsync.auth import PolicyError
from fieldsync.config import SETTINGS, ConfigError, Settings
from fieldsync.documents import TemplateError
from fieldsync.storage import Backend, ImportResult, OutboxEntry, OutboxState, SQLiteBackend


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
    demo.add_argument(
        "--mqtt",
        default="127.0.0.1:1883",
        help="host:port of the MQTT broker for the plant floor (alarms, meter readings), or off",
    )
    demo.add_argument(
        "--ldap",
        metavar="URL",
        help="ldap:// or ldaps:// URL of a directory the server takes team and region from "
        "(default: none; bind password in FIELDSYNC_DEMO_LDAP_PASSWORD)",
    )
    demo.add_argument("--ldap-bind-dn", default="", help="the DN the demo binds to --ldap as")
    demo.add_argument("--ldap-base-dn", default="", help="the DN the directory is read under")
    cluster = commands.add_parser(
        "cluster", help="run a local cluster: N nodes on this machine's PostgreSQL and Redis"
    )
    cluster.add_argument("--nodes", type=int, default=3)
    cluster.add_argument("--port", type=int, default=8081, help="the first node's; the issuer's -1")
    cluster.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    cluster.add_argument("--database", default="fieldsync_cluster", help="created when missing")
    cluster.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    cluster.add_argument("--data-dir", type=Path, default=Path(".data/cluster"))
    cluster.add_argument("--exit", action="store_true", help="stop once every node is ready")
    commands.add_parser("settings", help="list every setting with its variable and default")
    _add_reference_commands(commands)
    _outbox_parser(commands)
    _backup_parsers(commands)
    admin.add_commands(commands)
    args = parser.parse_args(argv)

    if args.command == "settings":
        for s in SETTINGS:
            print(f"{s.env:34} {s.name:22} default {s.default!r:14} {s.help}")
        return 0
    if args.command == "reference":
        return _reference_import(args)
    if args.command == "outbox":
        return _outbox(args)
    if args.command in ("backup", "restore"):
        return _backup_or_restore(args)
    if args.command in ("doc", "devices", "sessions"):
        return admin.run(args)
    if args.command == "cluster":
        from fieldsync.demo import run_cluster

        return asyncio.run(
            run_cluster(
                data_dir=args.data_dir,
                nodes=args.nodes,
                port=args.port,
                postgres=args.postgres,
                database=args.database,
                redis=args.redis,
                stay=not args.exit,
            )
        )
    if args.command == "demo":
        from fieldsync.demo import LdapOption, run_demo

        ldap = None
        if args.ldap is not None:
            ldap = LdapOption(args.ldap, args.ldap_bind_dn, args.ldap_base_dn)

        return asyncio.run(
            run_demo(
                data_dir=args.data_dir,
                port=args.port,
                work_orders=args.work_orders,
                devices=args.devices,
                rounds=args.rounds,
                stay=not args.exit,
                mqtt=None if args.mqtt == "off" else args.mqtt,
                ldap=ldap,
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
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)  # builds the adapters: a bad entry stops here, named
    except AdapterConfigError as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2

    async def reload_on_sighup(app: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy, app)

    app.on_startup.append(reload_on_sighup)
    # First of the shutdown hooks: whatever the drain still waits for, the process is gone
    # `drain_seconds` after SIGTERM (an orchestrator would SIGKILL it anyway; acks come only
    # after commits, so exiting loses nothing acknowledged).
    app.on_shutdown.insert(0, lambda app: _exit_after(settings.drain_seconds))
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log_class=AccessLogger,
        print=lambda text: print(text, flush=True),
        # How long open requests and sockets may take to finish once told to (4503 for devices).
        shutdown_timeout=settings.drain_seconds,
    )
    logging.getLogger("fieldsync").info("drained: stopped")
    return 0


async def _exit_after(seconds: float) -> None:
    def overdue() -> None:
        logging.getLogger("fieldsync").error("drain took over %.0f s: exiting now", seconds)
        logging.shutdown()
        os._exit(3)

    timer = threading.Timer(seconds, overdue)
    timer.daemon = True
    timer.start()


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


def _reference_import(args: argparse.Namespace) -> int:
    """One import of a `reference_sql` adapter of the adapters file into the data folder's
    store, the server running or not (SQLite serialises the two writers), with a progress bar
    (done/total, rows/s)."""
    try:
        settings = Settings.load(args.config)
        if not settings.adapters:
            raise ConfigError("FIELDSYNC_ADAPTERS", "required: the adapters file")
        table = read_file(Path(settings.adapters)).get(args.adapter)
        if table is None:
            raise AdapterConfigError(args.adapter, None, f"not in {settings.adapters}")
    except (ConfigError, AdapterConfigError) as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run_reference_import(settings, table, args.full))


async def _run_reference_import(settings: Settings, table: Table, full: bool) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    backend = backend_for(settings)
    await backend.open()
    try:
        context = AdapterContext(settings.data_path, backend.outbox, backend.reference)
        try:
            adapter = build_adapter(table, context)
            if not isinstance(adapter, ReferenceImporter):
                raise table.error("kind", f"{adapter.kind} has no rows to import")
        except AdapterConfigError as exc:
            print(f"fieldsync: {exc}", file=sys.stderr)
            return 2
        began = time.monotonic()
        try:
            total = await adapter.count(full=full)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>10,.0f} rows/s"),
                console=Console(stderr=True),
            ) as bar:
                task = bar.add_task(adapter.dataset, total=total, rate=0.0)

                def progress(result: ImportResult) -> None:
                    elapsed = max(time.monotonic() - began, 1e-6)
                    bar.update(task, completed=result.rows, rate=result.rows / elapsed)

                result = await adapter.import_rows(full=full, progress=progress)
        except Exception as exc:
            print(f"fieldsync: the import stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            await adapter.stop()
    finally:
        await backend.close()
    print(
        f"{result.dataset}: {result.rows} rows read, {result.created} created,"
        f" {result.updated} updated, {result.deleted} deleted, {result.unchanged} unchanged"
        f" in {time.monotonic() - began:.1f} s (seq {result.seq})"
    )
    return 0


def _outbox_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    outbox = commands.add_parser(
        "outbox", help="list the outbox, retry or skip an entry, replay an adapter from a seq"
    )
    outbox.add_argument("--config", type=Path, help="TOML file (FIELDSYNC_* variables override it)")
    outbox.add_argument("--data-dir", type=Path, help="the server's data folder")
    actions = outbox.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="entries by id, oldest first")
    listing.add_argument("--state", choices=[s.value for s in OutboxState])
    listing.add_argument("--adapter")
    listing.add_argument("--doc")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON array")
    for action, what in (("retry", "deliver again now"), ("skip", "never deliver")):
        acting = actions.add_parser(action, help=f"{what}: the entry and its document's dead ones")
        acting.add_argument("id", type=int)
    replay = actions.add_parser("replay", help="deliver again an adapter's entries from a seq")
    replay.add_argument("--adapter", required=True)
    replay.add_argument("--from-seq", type=int, required=True)


def _outbox(args: argparse.Namespace) -> int:
    """On the server's database through the store (PostgreSQL when `database_url` names it,
    else the data folder's SQLite file, which WAL lets this share with a running server): the
    runner sees the change within its poll period."""
    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2
    if settings.database_url:
        return asyncio.run(_outbox_action(args, backend_for(settings)))
    path = (args.data_dir or settings.data_path) / "fieldsync.db"
    if not path.exists():
        print(f"fieldsync: no database at {path}", file=sys.stderr)
        return 2
    return asyncio.run(_outbox_action(args, SQLiteBackend(path)))


async def _outbox_action(args: argparse.Namespace, backend: Backend) -> int:
    await backend.open()
    try:
        outbox = backend.outbox
        now = time.time()
        if args.action == "list":
            entries = await outbox.entries(
                adapter=args.adapter,
                state=OutboxState(args.state) if args.state else None,
                doc=args.doc,
                limit=args.limit,
            )
            if args.json:
                print(orjson.dumps([entry_json(e) for e in entries]).decode())
            else:
                for entry in entries:
                    print(_entry_line(entry))
            return 0
        if args.action == "replay":
            count = await outbox.replay(args.adapter, args.from_seq, now)
            print(f"{count} entries of {args.adapter} from seq {args.from_seq} to deliver again")
            return 0
        act = outbox.retry if args.action == "retry" else outbox.skip
        acted = await act(args.id, now)
        if acted is None:
            print(f"fieldsync: no outbox entry {args.id}", file=sys.stderr)
            return 1
        print(_entry_line(acted))
        return 0
    finally:
        await backend.close()


# --- fieldsync backup / restore ------------------------------------------------------------


def _backup_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = commands.add_parser(
        "backup", help="copy the database and its attachments into DEST, the server running"
    )
    backup.add_argument("dest", type=Path, help="a new (or empty) folder")
    restore = commands.add_parser(
        "restore", help="put the backup at SRC back as the data folder (server stopped)"
    )
    restore.add_argument("src", type=Path, help="a folder `fieldsync backup` wrote")
    restore.add_argument("--force", action="store_true", help="replace an existing database")
    for parser in (backup, restore):
        parser.add_argument("--config", type=Path, help="TOML file (FIELDSYNC_* override it)")
        parser.add_argument("--data-dir", type=Path, help="the server's data folder")
        parser.add_argument("--json", action="store_true", help="the result as one JSON object")


def _backup_or_restore(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fieldsync.backup import BackupError, backup, restore

    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2
    if settings.database_url and args.data_dir is None:
        print(
            "fieldsync: cluster mode (PostgreSQL): back up with pg_dump or pg_basebackup and"
            " copy the attachments folder after it (README: Backup and restore)",
            file=sys.stderr,
        )
        return 2
    data_dir = args.data_dir or settings.data_path
    with Progress(
        TextColumn("attachments"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        disable=args.json,
    ) as bar:
        task = bar.add_task("attachments", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            if args.command == "backup":
                manifest = backup(data_dir, args.dest, progress)
            else:
                if _server_answers(settings):
                    raise BackupError(
                        f"a server answers at {settings.host}:{settings.port}: stop it first"
                    )
                manifest = restore(args.src, data_dir, force=args.force, progress=progress)
        except (BackupError, OSError) as exc:
            print(f"fieldsync: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(orjson.dumps(asdict(manifest)).decode())
    else:
        where = args.dest if args.command == "backup" else data_dir
        print(
            f"{args.command}: {where}: seq {manifest.seq}, {manifest.docs} documents,"
            f" {manifest.attachments} attachments"
        )
    return 0


def _server_answers(settings: Settings) -> bool:
    """Whether a fieldsync server listens where the settings say (restore wants it stopped)."""
    import urllib.error
    import urllib.request

    if not settings.port:
        return False
    try:
        with urllib.request.urlopen(
            f"http://{settings.host}:{settings.port}/v1/health", timeout=2
        ) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _entry_line(entry: OutboxEntry) -> str:
    error = entry.error
    failed = f" {error.code} [{error.entity or '-'}] {error.message}" if error else ""
    return (
        f"{entry.id:>8} {entry.state.value:9} {entry.adapter:12} {entry.doc:24} seq {entry.seq}"
        f" attempts {entry.attempts}{failed}"
    )


if __name__ == "__main__":
    sys.exit(main())
