"""Where one update's server CPU goes, stage by stage (the write path issue's "measure first").

    .venv/bin/python bench/profile_stages.py [--s2 4000] [--s1-docs 20 --s1-clients 4
        --s1-updates 25 --pace-ms 100] [--v1] [--s4 2000] [--no-rules] [--json out.json]

Starts fieldsync as a child process (as `bench/serve.py` does: the real app, a loopback issuer,
SQLite with fsync) with a CPU timer around each stage of the write path, and drives it with
real WebSocket clients from this process:

  S2-like burst: one document, a writer sends N small updates as fast as it can over
      `/v1/yws` (the bench's mix: 60% a key of `fields`, 40% an append to `notes`), a second
      client receives them; with `--v1`, the same over `/v1/sync` (one frame per update, acks).
  S1-like fleet: D documents x C clients, each sends U paced updates; every update fans out to
      the C-1 others.
  S4-like idle (`--s4 N`): N synced idle connections over N/10 documents, the server's RSS
      growth per connection (the one figure here that is not CPU).

Each stage is timed with the thread's own CPU clock (`time.thread_time_ns`), exclusive of the
stages nested in it, so other processes on a shared machine do not count; "event loop, other"
is the loop thread's CPU not inside any stage (aiohttp's frame parsing, tasks and futures, the
session glue), "other threads" the process's CPU outside the loop thread and the writer's batch
(room loads, reads). The timers themselves cost ~0.3 µs each, ~15 per update. The stages:

  decode            y-protocols / fieldsync.v1 decoding of the incoming message
  authorise         the policy's path, scope and log checks on what the update writes
  apply + read      the update applied to the room's document, its roots watched (pycrdt);
                    before 2026-12-07 applied on a scratch replica, then by the room again
  pending check     `integrated`: nothing of the update waits in the document (the
                    "scratch check" of the tables before 2026-12-07)
  history read      pycrdt's deep events turned into field changes (FieldChange)
  accept            `Room.apply`: the merge of what the document emitted (before 2026-12-07
                    also the room's second apply)
  history record    the room's bookkeeping of those changes (`_record`, `take_changes`, ...)
  rules             the domain rules (`work_order`, `form`, their reads and corrections)
  index             the document's index recomputed (`reindex`, `tentative_index`)
  commit queue      the `Write` built and queued for the writer (`_commit`, `append`)
  SQL (writer)      the writer thread's batch: statements, history rows, COMMIT (its CPU)
  commit callbacks  the futures the writer settles, on the loop
  ack               the v1 `ack` control (clocks, JSON)
  fan-out encode    `_fan_out` (and `_on_commit`): the y message encoded once, queued to
                    every other peer
  fan-out send      framing and the socket write of every outgoing message (aiohttp's, or
                    `Connection._flush`: a loop turn's output in one write)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from pycrdt import Doc, Map, Text

BENCH = Path(__file__).resolve().parent
STAGES = (
    "decode",
    "authorise",
    "apply + read",
    "pending check",
    "history read",
    "accept",
    "history record",
    "rules",
    "index",
    "commit queue",
    "SQL (writer)",
    "commit callbacks",
    "ack",
    "fan-out encode",
    "fan-out send",
)


# ---------------------------------------------------------------- the server side (child)


class Timers:
    """CPU per stage, exclusive of nested stages, per thread."""

    def __init__(self) -> None:
        self.cpu: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._local = threading.local()

    def reset(self) -> None:
        self.cpu.clear()
        self.calls.clear()

    def _stack(self) -> list[int]:
        stack: list[int] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def sync(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, cpu, calls, stack_of = time.thread_time_ns, self.cpu, self.calls, self._stack

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = stack_of()
            stack.append(0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                inner = stack.pop()
                cpu[name] += elapsed - inner
                calls[name] += 1
                if stack:
                    stack[-1] += elapsed

        return timed

    def coro(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """An async function that normally finishes without suspending (a socket write)."""
        clock, cpu, calls, stack_of = time.thread_time_ns, self.cpu, self.calls, self._stack

        @functools.wraps(fn)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            stack = stack_of()
            depth = len(stack)
            stack.append(0)
            start = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                del stack[depth:]  # a suspension may have interleaved other timers
                cpu[name] += elapsed
                calls[name] += 1

        return timed


def install(timers: Timers) -> None:
    """Wrap each stage's functions (classes and module globals, before the app is built)."""
    from aiohttp import web

    from fieldsync.documents import _paths, _rule_set
    from fieldsync.replication import _replicator, _room, _session, _yws
    from fieldsync.replication._connection import Connection
    from fieldsync.replication._replicator import Replicator
    from fieldsync.replication._room import Room
    from fieldsync.replication._session import V1Session
    from fieldsync.storage import _sqlite

    def wrap(owner: Any, attr: str, stage: str, kind: str = "sync") -> None:
        original = getattr(owner, attr)
        wrapped = timers.coro(stage, original) if kind == "coro" else timers.sync(stage, original)
        setattr(owner, attr, wrapped)

    for module in (_yws, _session):
        wrap(module, "decode_y", "decode")
    wrap(_session, "decode_frame", "decode")
    wrap(Replicator, "_check_write", "authorise")
    wrap(_room, "check_count", "authorise")
    wrap(_paths.Watched, "written", "apply + read")
    wrap(_paths, "root_names", "apply + read")
    wrap(_room, "integrated", "pending check")
    original_collector = _paths._collector

    def collector(*args: Any, **kwargs: Any) -> Any:
        return timers.sync("history read", original_collector(*args, **kwargs))

    _paths._collector = collector
    wrap(Room, "apply", "accept")
    wrap(_room, "merge_updates", "accept")
    for attr in ("_record", "take_changes", "touched"):
        wrap(Room, attr, "history record")
    for attr in ("work_order", "form", "forms_needed", "form_blocks"):
        wrap(_rule_set.DomainRules, attr, "rules")
    wrap(Room, "read", "rules")
    wrap(Room, "write", "rules")
    wrap(Room, "reindex", "index")
    wrap(Room, "tentative_index", "index")
    wrap(Replicator, "_commit", "commit queue")
    wrap(_sqlite.SQLiteStore, "append", "commit queue")
    wrap(_sqlite.SQLiteStore, "_commit_batch", "SQL (writer)")
    wrap(_sqlite, "_resolve", "commit callbacks")
    wrap(V1Session, "_acked", "ack")
    wrap(V1Session, "_ack", "ack")
    wrap(Replicator, "_on_commit", "fan-out encode")
    if hasattr(Replicator, "_fan_out"):  # since the relay before the commit (`fanout`)
        wrap(Replicator, "_fan_out", "fan-out encode")
    wrap(_replicator, "encode_sync", "fan-out encode")
    wrap(web.WebSocketResponse, "send_bytes", "fan-out send", "coro")
    if hasattr(Connection, "_flush"):  # since a turn's output is written at its end
        wrap(Connection, "_flush", "fan-out send")


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from fieldsync import documents
    from fieldsync.app import REPLICATOR, AccessLogger, create_app
    from fieldsync.auth import DevIssuer, DevUser
    from fieldsync.config import Settings

    timers = Timers()
    install(timers)
    admin = DevUser("admin-subject", ("admin",), None, None, "Bench Admin")
    issuer = DevIssuer({admin.subject: admin}, host="127.0.0.1")
    await issuer.start()
    settings = Settings.load(
        environ={},
        data_dir=str(args.data_dir),
        oidc_issuer=issuer.issuer,
        host="127.0.0.1",
        port=0,
        rate=1e6,
        burst=1e6,
        max_sockets_per_subject=100_000,  # every client holds the one admin token
        log_level="WARNING",
    )
    app = create_app(settings)
    if args.no_rules:
        app[REPLICATOR].rules = documents.NO_RULES
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    marks = {"loop": time.thread_time_ns(), "process": time.process_time_ns()}

    def reset() -> None:
        timers.reset()
        marks.update(loop=time.thread_time_ns(), process=time.process_time_ns())

    def dump() -> None:
        report = {
            "loop_cpu_ns": time.thread_time_ns() - marks["loop"],
            "process_cpu_ns": time.process_time_ns() - marks["process"],
            "cpu_ns": dict(timers.cpu),
            "calls": dict(timers.calls),
        }
        print(json.dumps(report), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, reset)
    loop.add_signal_handler(signal.SIGUSR2, dump)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    token = issuer.issue(admin.subject, ttl=86400)
    print(json.dumps({"port": runner.addresses[0][1], "token": token}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await issuer.stop()


# ---------------------------------------------------------------- the clients (parent)


def varuint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varuint(data: bytes, at: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = data[at]
        at += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return n, at
        shift += 7


def sync_message(step: int, payload: bytes) -> bytes:
    return b"\x00" + varuint(step) + varuint(len(payload)) + payload


class YwsClient:
    """A plain y-websocket replica of one document (what stock Yjs providers do)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.doc: Doc[Any] = Doc()
        self.fields = self.doc.get("fields", type=Map)
        self.notes = self.doc.get("notes", type=Text)
        self.outbox: list[bytes] = []
        self.synced = asyncio.Event()
        self.changed = asyncio.Event()
        self.closed: int | None = None
        self._remote = False
        self.doc.observe(self._local)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    def _local(self, event: Any) -> None:
        if not self._remote:
            self.outbox.append(event.update)

    async def connect(self, session: aiohttp.ClientSession) -> None:
        self.ws = await session.ws_connect(self.url, max_msg_size=0, heartbeat=None)
        self._reader = asyncio.create_task(self._read())
        await self.ws.send_bytes(sync_message(0, self.doc.get_state()))

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                break
            data = message.data
            if data[0] != 0:
                continue  # awareness
            step, at = read_varuint(data, 1)
            size, at = read_varuint(data, at)
            payload = data[at : at + size]
            if step == 0:
                await self.ws.send_bytes(sync_message(1, self.doc.get_update(payload)))
            else:
                self._remote = True
                try:
                    self.doc.apply_update(payload)
                finally:
                    self._remote = False
                if step == 1:
                    self.synced.set()
                self.changed.set()
        self.closed = self.ws.close_code

    async def flush(self) -> None:
        assert self.ws is not None
        out, self.outbox = self.outbox, []
        for update in out:
            await self.ws.send_bytes(sync_message(2, update))

    def clock(self, client: int) -> int:
        from fieldsync.replication import decode_state_vector

        return decode_state_vector(self.doc.get_state()).get(client, 0)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


def edit(client: YwsClient | Doc[Any], rng: random.Random, i: int) -> None:
    """One small edit, the bench's mix."""
    doc = client.doc if isinstance(client, YwsClient) else client
    with doc.transaction():
        if rng.random() < 0.6:
            doc.get("fields", type=Map)[f"f{rng.randrange(20)}"] = f"v{i}"
        else:
            doc.get("notes", type=Text).insert(len(str(doc.get("notes", type=Text))), f" n{i}")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


class Server:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        hello = json.loads(proc.stdout.readline())
        self.port, self.token = hello["port"], hello["token"]

    def yws_url(self, doc: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/yws/wo:{doc}?token={self.token}"

    def reset(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    async def report(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR2)
        line = await asyncio.to_thread(self.proc.stdout.readline)
        report: dict[str, Any] = json.loads(line)
        return report


async def seeded(session: aiohttp.ClientSession, server: Server, doc: str, n: int) -> list[Any]:
    clients = [YwsClient(server.yws_url(doc)) for _ in range(n)]
    for client in clients:
        await client.connect(session)
        await asyncio.wait_for(client.synced.wait(), 60)
    return clients


async def s2_yws(server: Server, updates: int, run: str) -> dict[str, Any]:
    rng = random.Random(2)
    async with aiohttp.ClientSession() as session:
        writer, receiver = await seeded(session, server, f"{run}-s2", 2)
        for i in range(1, updates + 1):
            edit(writer, rng, i)
        frames = [sync_message(2, u) for u in writer.outbox]
        writer.outbox = []
        client = writer.doc.client_id
        final = writer.clock(client)
        server.reset()
        assert writer.ws is not None
        for i, frame in enumerate(frames):
            await writer.ws.send_bytes(frame)
            if i % 64 == 63:
                await asyncio.sleep(0)
        await until(lambda: receiver.clock(client) >= final, "the receiver has every update")
        report = await server.report()
        await writer.close()
        await receiver.close()
    return report


async def s2_v1(server: Server, updates: int, run: str) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    from v1_load import Device, new_session

    from fieldsync.replication import DocMessage, SyncStep, decode_state_vector, encode_sync

    rng = random.Random(2)
    doc_id = f"wo:{run}-v1s2"
    url = f"ws://127.0.0.1:{server.port}/v1/sync"
    async with new_session() as session:
        writer = Device(url, server.token, [], f"{run}-writer")
        receiver = Device(url, server.token, [], f"{run}-receiver")
        for device in (writer, receiver):
            await device.connect(session)
            await device.hello()
            await until(device.caught_up.is_set, "changes after hello")
            await device.send([DocMessage(doc_id, encode_sync(SyncStep.STEP1, b"\x00"))])
            await until(functools.partial(_has_step2, device, doc_id), "step 2")
        ydoc = writer.doc(doc_id)
        sent: list[bytes] = []
        ydoc.observe(lambda event: sent.append(event.update))
        for i in range(1, updates + 1):
            edit(ydoc, rng, i)
        client = ydoc.client_id
        final = decode_state_vector(ydoc.get_state())[client]
        server.reset()
        for i, update in enumerate(sent):
            await writer.send([DocMessage(doc_id, encode_sync(SyncStep.UPDATE, update))])
            if i % 64 == 63:
                await asyncio.sleep(0)
        await until(
            lambda: (
                writer.ack_clock.get(doc_id, {}).get(client, 0) >= final
                and receiver.state_vector(doc_id).get(client, 0) >= final
            ),
            "every update acked and received",
        )
        report = await server.report()
        await writer.close()
        await receiver.close()
    return report


async def s1(
    server: Server, docs: int, clients: int, updates: int, pace_ms: float, run: str
) -> dict[str, Any]:
    rng = random.Random(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        groups = [await seeded(session, server, f"{run}-s1-{d}", clients) for d in range(docs)]
        # One update per document first, so every room exists before the timed part.
        for group in groups:
            edit(group[0], rng, 0)
            await group[0].flush()
        everyone = [c for group in groups for c in group]
        for group in groups:
            first = group[0].doc.client_id
            want = group[0].clock(first)
            await until(functools.partial(_all_at, group, first, want), "seed")
        server.reset()

        async def editor(client: YwsClient, r: random.Random) -> None:
            for i in range(1, updates + 1):
                await asyncio.sleep(r.uniform(0, 2 * pace_ms / 1000))
                edit(client, r, i)
                await client.flush()

        await asyncio.gather(*(editor(c, random.Random(rng.random())) for c in everyone))
        for group in groups:
            for writer in group:
                cid = writer.doc.client_id
                want = writer.clock(cid)
                await until(functools.partial(_all_at, group, cid, want), "fan")
        report = await server.report()
        for client in everyone:
            await client.close()
    return report


def _has_step2(device: Any, doc_id: str) -> bool:
    return doc_id in device.step2


def _all_at(group: Sequence[YwsClient], client: int, clock: int) -> bool:
    """Every client of `group` holds `client`'s edits up to `clock`."""
    return all(member.clock(client) >= clock for member in group)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def s4(server: Server, connections: int, run: str) -> float:
    """Idle connections as S4 (synced, over one document per ten), the server's RSS growth
    per connection in KiB."""
    before = rss(server.proc.pid)
    limit = asyncio.Semaphore(50)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [
            YwsClient(server.yws_url(f"{run}-s4-{n % (connections // 10 or 1)}"))
            for n in range(connections)
        ]

        async def connect(client: YwsClient) -> None:
            async with limit:
                await client.connect(session)
                await asyncio.wait_for(client.synced.wait(), 60)

        await asyncio.gather(*(connect(client) for client in clients))
        await asyncio.sleep(2)  # the hold: what stays allocated per idle socket
        grown = rss(server.proc.pid) - before
        await asyncio.gather(*(client.close() for client in clients))
    return grown / connections / 1024


def table(report: dict[str, Any], updates: int) -> list[tuple[str, float]]:
    """µs per update by stage, then what is left of the loop thread and the process."""
    cpu = report["cpu_ns"]
    rows = [(stage, cpu.get(stage, 0) / updates / 1e3) for stage in STAGES]
    in_loop = sum(ns for stage, ns in cpu.items() if stage != "SQL (writer)")
    rows.append(("event loop, other", (report["loop_cpu_ns"] - in_loop) / updates / 1e3))
    other_threads = report["process_cpu_ns"] - report["loop_cpu_ns"] - cpu.get("SQL (writer)", 0)
    rows.append(("other threads", other_threads / updates / 1e3))
    rows.append(("total (server process)", report["process_cpu_ns"] / updates / 1e3))
    return rows


async def drive(args: argparse.Namespace, server: Server) -> dict[str, tuple[int, Any]]:
    run = f"p{os.getpid()}"
    results: dict[str, tuple[int, dict[str, Any]]] = {}
    if args.s2:
        results["S2 burst /v1/yws"] = (args.s2, await s2_yws(server, args.s2, run))
        if args.v1:
            results["S2 burst /v1/sync"] = (args.s2, await s2_v1(server, args.s2, run))
    if args.s1_docs:
        fleet = args.s1_docs * args.s1_clients * args.s1_updates
        report = await s1(server, args.s1_docs, args.s1_clients, args.s1_updates, args.pace_ms, run)
        results["S1 fleet /v1/yws"] = (fleet, report)
    if args.s4:
        kib = await s4(server, args.s4, run)
        print(f"S4: {args.s4} idle /v1/yws connections: {kib:.1f} KiB of server RSS each")
    return results


def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--serve", "--data-dir", tmp]
        command += ["--no-rules"] if args.no_rules else []
        command += ["--cprofile", str(args.cprofile.resolve())] if args.cprofile else []
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            results = asyncio.run(drive(args, Server(proc)))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    names = list(results)
    if not names:
        return
    tables = {name: table(report, n) for name, (n, report) in results.items()}
    print(f"µs of server CPU per update ({'no rules' if args.no_rules else 'rules on'})")
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for i, (stage, _) in enumerate(tables[names[0]]):
        cells = " | ".join(f"{tables[name][i][1]:.1f}" for name in names)
        print(f"| {stage} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps({name: report for name, (_, report) in results.items()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--s2", type=int, default=4000, help="S2 updates (0: skip)")
    parser.add_argument("--v1", action="store_true", help="S2 over /v1/sync too (acks)")
    parser.add_argument("--s1-docs", type=int, default=20)
    parser.add_argument("--s1-clients", type=int, default=4)
    parser.add_argument("--s1-updates", type=int, default=25)
    parser.add_argument("--pace-ms", type=float, default=100.0)
    parser.add_argument("--s4", type=int, default=0, help="S4 idle connections (0: skip)")
    parser.add_argument("--no-rules", action="store_true")
    parser.add_argument("--cprofile", type=Path, help="also a cProfile of the server, here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve and args.cprofile:
        import cProfile

        with cProfile.Profile() as profiler:
            asyncio.run(serve(args))
        profiler.dump_stats(args.cprofile)
    elif args.serve:
        asyncio.run(serve(args))
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
