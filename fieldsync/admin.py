"""The operators' commands on documents, devices and sessions (`fieldsync doc …`,
`fieldsync devices`, `fieldsync sessions`), each with `--json` for scripts.

`doc` and `devices` work on the data folder's database, the server running or not (SQLite in WAL
mode serialises the writers), except `doc import`, which writes documents through the write
path (authorisation, domain rules, history) of its own and so wants the server stopped: a
running server would keep its own copy of a loaded document in memory. `sessions` asks the
running server (`GET /v1/admin/sessions`) with an admin's access token: who is connected is
what that process holds, and no table could say it more truly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pycrdt import Doc

from fieldsync import documents
from fieldsync.app import backend_for, load_policy, load_templates
from fieldsync.auth import Principal, Role
from fieldsync.config import ConfigError, Settings
from fieldsync.errors import FieldsyncError
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import Replicator
from fieldsync.storage import Backend, SQLiteBackend, StoredDoc

__all__ = ["add_commands", "run"]

_ALL = ScopeFilter(ScopeKind.ALL)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doc = commands.add_parser("doc", help="show, trace, compact, export or import documents")
    actions = doc.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="a document's content, seq and index row")
    show.add_argument("doc")
    history = actions.add_parser("history", help="a document's field changes, newest first")
    history.add_argument("doc")
    history.add_argument("--path", help="one field (and its sub-paths), e.g. fields.status")
    history.add_argument("--limit", type=int, default=50)
    compact = actions.add_parser("compact", help="merge update logs into snapshots now")
    export = actions.add_parser("export", help="documents as JSON lines (their whole CRDT state)")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    for action in (compact, export):
        action.add_argument("docs", nargs="*", help="document ids (none with --all)")
        action.add_argument("--all", action="store_true", help="every document")
    imported = actions.add_parser(
        "import", help="merge exported documents in through the write path (server stopped)"
    )
    imported.add_argument("file", type=Path, help="JSON lines `fieldsync doc export` wrote")
    devices = commands.add_parser("devices", help="devices by last contact, newest first")
    devices.add_argument("--subject", help="one user's devices")
    devices.add_argument("--limit", type=int, default=100)
    sessions = commands.add_parser("sessions", help="who is connected now (asks the server)")
    sessions.add_argument("--url", help="the server (default: from the settings' host and port)")
    sessions.add_argument(
        "--token-file", type=Path, required=True, help="a file holding an admin's access token"
    )
    for parser in (show, history, compact, export, imported, devices, sessions):
        parser.add_argument("--config", type=Path, help="TOML file (FIELDSYNC_* override it)")
        parser.add_argument("--data-dir", type=Path, help="the server's data folder")
        parser.add_argument("--json", action="store_true", help="the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "sessions":
            return asyncio.run(_sessions(args, settings))
        backend = _backend(args, settings)
        if args.command == "devices":
            return asyncio.run(_devices(args, backend))
        return asyncio.run(_doc(args, settings, backend))
    except _Refused as exc:
        print(f"fieldsync: {exc}", file=sys.stderr)
        return exc.status


def _backend(args: argparse.Namespace, settings: Settings) -> Backend:
    """The configured database (PostgreSQL in cluster mode), or the SQLite one of `--data-dir`."""
    if settings.database_url and args.data_dir is None:
        return backend_for(settings)
    path = (args.data_dir or settings.data_path) / "fieldsync.db"
    # An import may fill a new data folder; everything else reads an existing one.
    if getattr(args, "action", None) == "import":
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise _Refused(f"no database at {path}")
    return SQLiteBackend(path)


class _Refused(Exception):
    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _emit(args: argparse.Namespace, value: Any, text: Callable[[], str]) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(value, default=str).decode() + "\n")
    else:
        print(text())


@contextmanager
def _progress(label: str, total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (none with --json): call the yielded function with `done`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        disable=quiet,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# --- fieldsync doc ------------------------------------------------------------------------


async def _doc(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    await backend.open()
    try:
        store = backend.store
        if args.action == "show":
            stored = await store.load(args.doc)
            if stored is None:
                raise _Refused(f"no document {args.doc}", 1)
            shown = _shown(args.doc, stored)
            _emit(args, shown, lambda: orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
        elif args.action == "history":
            entries = await store.history(args.doc, args.path, None, args.limit)
            rows = [
                {
                    "seq": e.seq,
                    "at": e.at,
                    "actor": e.actor,
                    "origin": str(e.origin),
                    "path": e.change.path,
                    "old": e.change.old,
                    "new": e.change.new,
                }
                for e in entries
            ]
            _emit(args, rows, lambda: "\n".join(map(_history_line, rows)))
        elif args.action == "compact":
            if not isinstance(backend, SQLiteBackend):
                raise _Refused("PostgreSQL: the nodes compact on their own (compact_after)")
            ids = await _chosen(args, backend)
            merged = 0
            with _progress("compact", len(ids), args.json) as advance:
                for done, doc_id in enumerate(ids, 1):
                    merged += await backend.store.compact(doc_id)
                    advance(done)
            result = {"docs": len(ids), "log_rows_merged": merged}
            _emit(args, result, lambda: f"{len(ids)} documents, {merged} log rows merged")
        elif args.action == "export":
            return await _export(args, backend)
        else:
            return await _import(args, settings, backend)
        return 0
    finally:
        await backend.close()


def _state(stored: StoredDoc) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    for data in ([stored.snapshot] if stored.snapshot else []) + stored.updates:
        doc.apply_update(data)
    return doc


def _shown(doc_id: str, stored: StoredDoc) -> dict[str, Any]:
    index = stored.index
    return {
        "doc": doc_id,
        "seq": stored.seq,
        "log_rows": len(stored.updates),
        "index": None
        if index is None
        else {
            "status": index.status,
            "assignee": index.assignee,
            "team": index.team,
            "region": index.region,
        },
        "content": documents.to_json(doc_id, _state(stored)),
    }


def _history_line(row: dict[str, Any]) -> str:
    old, new = (orjson.dumps(row[k], default=str).decode() for k in ("old", "new"))
    return f"{row['seq']:>8} {_when(row['at'])} {row['actor']:16} {row['path']}: {old} -> {new}"


async def _chosen(args: argparse.Namespace, backend: Backend) -> list[str]:
    if args.all == bool(args.docs):
        raise _Refused("name documents, or --all (not both)")
    if args.docs:
        return list(args.docs)
    ids: list[str] = []
    since = 0
    while True:  # every document, through the change feed
        page = await backend.store.changes(_ALL, since, 1000)
        ids += [d.id for d in page.docs]
        since = page.upto
        if not page.more:
            return sorted(set(ids))


async def _export(args: argparse.Namespace, backend: Backend) -> int:
    ids = await _chosen(args, backend)
    written = 0
    partial = args.out.with_name(args.out.name + ".partial")
    out = await asyncio.to_thread(partial.open, "wb")
    try:
        with _progress("export", len(ids), args.json) as advance:
            for done, doc_id in enumerate(ids, 1):
                stored = await backend.store.load(doc_id)
                if stored is None:
                    raise _Refused(f"no document {doc_id}", 1)
                state = _state(stored).get_update()
                line = {"doc": doc_id, "seq": stored.seq, "state": base64.b64encode(state).decode()}
                await asyncio.to_thread(out.write, orjson.dumps(line) + b"\n")
                written += 1
                advance(done)
    finally:
        await asyncio.to_thread(out.close)
    partial.replace(args.out)
    _emit(args, {"docs": written, "file": str(args.out)}, lambda: f"{written} documents exported")
    return 0


class _Importer:
    """The `Peer` an import writes as: an admin (who may create and write every document), its
    changes recorded with the origin `rest:fieldsync-import` in the history."""

    def __init__(self) -> None:
        self.principal = Principal("fieldsync-import", frozenset({Role.ADMIN}))
        self.scope = _ALL
        self.origin = Origin(OriginKind.REST, "fieldsync-import")
        self.corrections: list[tuple[str, str, str]] = []

    def send_doc(self, doc_id: str, message: bytes) -> None:
        pass

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        pass

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        pass

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        pass

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        self.corrections.append((doc_id, rule, detail))

    def reset(self, doc_id: str, reason: str) -> None:
        pass


async def _import(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    if await _server_answers(settings):
        raise _Refused(f"a server answers at {settings.host}:{settings.port}: stop it first")
    try:
        lines = [orjson.loads(line) for line in args.file.read_bytes().splitlines() if line]
        states = [(str(line["doc"]), base64.b64decode(line["state"])) for line in lines]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise _Refused(f"{args.file}: not an export of fieldsync doc export ({exc})") from None
    replicator = Replicator(
        backend.store, policy=load_policy(settings), templates=load_templates(settings)
    )
    await replicator.start()
    peer = _Importer()
    changed = unchanged = 0
    refused: list[dict[str, str]] = []
    try:
        with _progress("import", len(states), args.json) as advance:
            for done, (doc_id, state) in enumerate(states, 1):
                try:
                    room = await replicator.subscribe(peer, doc_id)
                    submitted = await replicator.submit(peer, room, state)
                    if submitted.committed is None:
                        unchanged += 1
                    else:
                        await asyncio.shield(submitted.committed)
                        changed += 1
                    replicator.unsubscribe(peer, room)
                except FieldsyncError as exc:
                    refused.append({"doc": doc_id, "code": exc.code.value, "message": exc.message})
                advance(done)
    finally:
        await replicator.stop()
    result = {
        "docs": len(states),
        "changed": changed,
        "unchanged": unchanged,
        "refused": refused,
        "corrected": [{"doc": d, "rule": r, "detail": t} for d, r, t in peer.corrections],
    }
    _emit(
        args,
        result,
        lambda: (
            f"{changed} documents changed, {unchanged} unchanged, {len(refused)} refused"
            + "".join(f"\n  {r['doc']}: {r['code']}: {r['message']}" for r in refused)
        ),
    )
    return 1 if refused else 0


async def _server_answers(settings: Settings) -> bool:
    if not settings.port:
        return False
    try:
        timeout = aiohttp.ClientTimeout(total=2)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(f"http://{settings.host}:{settings.port}/v1/health") as answer,
        ):
            return answer.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


# --- fieldsync devices / sessions ---------------------------------------------------------


async def _devices(args: argparse.Namespace, backend: Backend) -> int:
    await backend.open()
    try:
        devices = await backend.store.devices(args.subject, args.limit)
    finally:
        await backend.close()
    rows: list[dict[str, Any]] = [
        {
            "device": d.device_id,
            "subject": d.subject,
            "platform": d.platform,
            "version": d.version,
            "last_seen": d.last_seen,
            "last_seq": d.last_seq,
        }
        for d in devices
    ]
    now = time.time()
    _emit(
        args,
        rows,
        lambda: "\n".join(
            f"{r['device']:24} {r['subject']:16} {r['platform'] or '-':8} {r['version'] or '-':10}"
            f" seen {_when(r['last_seen'])} ({(now - r['last_seen']) / 3600:.1f} h ago)"
            f" seq {r['last_seq']}"
            for r in rows
        ),
    )
    return 0


async def _sessions(args: argparse.Namespace, settings: Settings) -> int:
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        raise _Refused(f"the token file: {exc}") from None
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(url + "/v1/admin/sessions", headers=headers) as answer,
        ):
            body = await answer.json(content_type=None)
            status = answer.status
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError, ValueError) as e:
        raise _Refused(f"no answer from {url}: {type(e).__name__}", 1) from None
    if status != 200:
        raise _Refused(f"{url}: {status} {body.get('code')}: {body.get('detail', '')}", 1)
    sessions = body["items"]
    _emit(
        args,
        sessions,
        lambda: (
            "\n".join(
                f"{s['id']:24} {s['subject'] or '-':16} {s['device'] or '-':20}"
                f" {s['platform'] or '-'} {s['version'] or '-'} since {_when(s['connected_at'])}"
                f" {s['documents']} docs"
                for s in sessions
            )
            or "no sessions"
        ),
    )
    return 0
