"""Ack after durability (DESIGN.md §3, §4), tested the hard way: the real entry point,
`fieldsync serve`, runs as its own process and is killed with SIGKILL while several devices
stream small updates to several work orders; then it is restarted on the same data folder.

After every kill: the database passes `PRAGMA integrity_check`, and its change sequence covers
every seq that was acknowledged. After every restart: each acknowledged update is there (the
server's state vectors cover its clock and its key holds its value), the server's head is where
the killed process left it, and new writes get larger seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import sqlite3
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from fieldsync.auth import DevIssuer
from fieldsync.replication import DocMessage, SyncStep, decode_state_vector, encode_sync
from tests.harness import work_order
from tests.wire import Wire, connect

pytestmark = pytest.mark.slow

SEED = 20240917
KILLS = 3
DOCS = tuple(f"wo:durable-{i}" for i in range(4))
WRITERS = 4
WINDOW = 24  # updates each writer keeps in flight: sent, not yet acknowledged
COMPACT_AFTER = 40  # small, so that kills also land around compactions
_RUNNING_ON = re.compile(r"Running on (http://[^\s,]+)")


# --- the server process ------------------------------------------------------------------


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    url: str
    output: deque[str]  # its last lines of stdout and stderr, for failure messages

    @property
    def sync_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/v1/sync"

    async def kill(self) -> None:
        self.process.kill()
        assert await self.process.wait() == -signal.SIGKILL


@asynccontextmanager
async def serve(data_dir: Path, issuer: DevIssuer, **settings: str) -> AsyncIterator[ServerProcess]:
    """`fieldsync serve` configured only through its environment, on a free port; `settings`
    are more `FIELDSYNC_*` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env |= {
        "PYTHONUNBUFFERED": "1",
        "FIELDSYNC_HOST": "127.0.0.1",
        "FIELDSYNC_PORT": "0",
        "FIELDSYNC_DATA_DIR": str(data_dir),
        "FIELDSYNC_OIDC_ISSUER": issuer.issuer,
        "FIELDSYNC_COMPACT_AFTER": str(COMPACT_AFTER),
        **{f"FIELDSYNC_{name.upper()}": value for name, value in settings.items()},
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fieldsync",
        "serve",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=data_dir.parent,
    )
    output: deque[str] = deque(maxlen=200)
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    reader = asyncio.create_task(_read_output(process, output, bound))
    try:
        try:
            async with asyncio.timeout(30):
                url = await bound
        except (TimeoutError, EOFError):
            raise AssertionError("fieldsync serve did not start:\n" + "".join(output)) from None
        yield ServerProcess(process, url, output)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await reader


async def _read_output(
    process: asyncio.subprocess.Process, output: deque[str], bound: asyncio.Future[str]
) -> None:
    """Keep the pipe drained; resolve `bound` with the URL aiohttp prints once it listens (with
    port 0 it prints the port it was given)."""
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode(errors="replace")
        output.append(line)
        found = _RUNNING_ON.search(line)
        if found and not bound.done():
            bound.set_result(found.group(1))
    if not bound.done():
        bound.set_exception(EOFError())


def inspect_database(path: Path) -> tuple[list[tuple[Any, ...]], int, int]:
    """Read-only, after a kill: the integrity check, the stored head of the change sequence,
    and the highest seq anything in the database refers to."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        check = db.execute("PRAGMA integrity_check").fetchall()
        ((head,),) = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchall()
        ((used,),) = db.execute(
            """SELECT max(coalesce((SELECT max(seq) FROM updates), 0),
                          coalesce((SELECT max(last_seq) FROM doc_index), 0),
                          coalesce((SELECT max(upto_seq) FROM snapshots), 0))"""
        ).fetchall()
    return check, int(head), int(used)


# --- devices --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """An update sent to the server: it sets `key` to `value` in the document's `fields`, and
    takes its Yjs client to `clock`."""

    doc: str
    key: str
    value: Any
    client: int
    clock: int


@dataclass(frozen=True, slots=True)
class Acked:
    sent: Sent
    seq: int


def ack_of(sent: Sent, ack: dict[str, Any]) -> Acked:
    assert ack["doc"] == sent.doc, (ack, sent)
    # The server vouches for the update only if its durable clock covers the update's.
    assert ack["clock"].get(str(sent.client), 0) >= sent.clock, (ack, sent)
    return Acked(sent, ack["seq"])


class Writer:
    """A device streaming one-key updates over a bare connection, `WINDOW` of them in flight,
    recording every ack; it stops when the connection drops or, given a `limit`, when that many
    updates are acknowledged."""

    def __init__(self, wire: Wire, rng: random.Random, keys: Iterator[int], limit: int | None):
        self.wire = wire
        self.rng = rng
        self.keys = keys
        self.limit = limit
        # A new Yjs client per document and per run: a real device would resume its clock from
        # what the restarted server holds; new clients sidestep that without changing the test.
        self.docs: dict[str, Doc[Any]] = {
            doc_id: Doc(client_id=rng.getrandbits(32)) for doc_id in DOCS
        }
        self.in_flight: deque[Sent] = deque()
        self.acked: list[Acked] = []
        self.acking = asyncio.Event()
        self._window = asyncio.Semaphore(WINDOW)

    async def run(self) -> None:
        sender = asyncio.create_task(self._send())
        try:
            await self._receive()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _send(self) -> None:
        for _ in itertools.count() if self.limit is None else range(self.limit):
            await self._window.acquire()
            doc_id = self.rng.choice(DOCS)
            doc = self.docs[doc_id]
            before = doc.get_state()
            n = next(self.keys)
            doc.get("fields", type=Map)[f"k{n}"] = n
            clock = decode_state_vector(doc.get_state())[doc.client_id]
            self.in_flight.append(Sent(doc_id, f"k{n}", n, doc.client_id, clock))
            try:
                await self.wire.update(doc_id, doc.get_update(before))
            except (ConnectionError, aiohttp.ClientError):
                return  # killed: the receiver takes the acks that made it, then stops

    async def _receive(self) -> None:
        # Per connection, acks come in the order the updates were sent: commits keep apply order.
        while self.limit is None or len(self.acked) < self.limit:
            try:
                ack = await self.wire.control("ack")
            except AssertionError:
                if self.wire.closed:
                    return  # every ack that arrived before the close has been taken
                raise
            self.acked.append(ack_of(self.in_flight.popleft(), ack))
            self.acking.set()
            self._window.release()


async def stream(
    server: ServerProcess,
    token: str,
    rng: random.Random,
    keys: Iterator[int],
    *,
    kill_after: float | None = None,
    limit: int | None = None,
) -> list[Acked]:
    """`WRITERS` devices write concurrently. With `kill_after`, the server is killed that long
    after every writer has had an ack; else each writer stops after `limit` acks."""
    async with contextlib.AsyncExitStack() as stack:
        writers = []
        for i in range(WRITERS):
            wire = await stack.enter_async_context(connect(server.sync_url, token))
            await wire.hello(device_id=f"writer-{i}")
            writers.append(Writer(wire, random.Random(rng.getrandbits(64)), keys, limit))
        async with asyncio.TaskGroup() as group:
            for writer in writers:
                group.create_task(writer.run())
            if kill_after is not None:
                async with asyncio.timeout(10):
                    for writer in writers:
                        await writer.acking.wait()
                await asyncio.sleep(kill_after)  # the random moment of the kill
                await server.kill()
        for writer in writers:
            assert not [c for c in writer.wire.controls if c["type"] == "error"]
            seqs = [a.seq for a in writer.acked]
            assert seqs == sorted(set(seqs)), "seqs on one connection must strictly grow"
    acked = [a for writer in writers for a in writer.acked]
    assert len({a.seq for a in acked}) == len(acked), "two updates acked with one seq"
    return acked


async def create_work_orders(server: ServerProcess, token: str) -> list[Acked]:
    async with connect(server.sync_url, token) as wire:
        await wire.hello(device_id="creator")
        sent = []
        for doc_id in DOCS:
            doc = work_order(doc_id)
            clock = decode_state_vector(doc.get_state())[doc.client_id]
            sent.append(Sent(doc_id, "number", doc_id.split(":", 1)[1], doc.client_id, clock))
            await wire.update(doc_id, doc.get_update())
        return [ack_of(s, await wire.control("ack", doc=s.doc)) for s in sent]


async def read_back(server: ServerProcess, token: str) -> tuple[int, dict[str, Any]]:
    """A fresh device's view: the server's head, and per document its content (step 2 against
    an empty state vector) with the state vector the server declares durable (its step 1)."""
    async with connect(server.sync_url, token) as wire:
        welcome = await wire.hello(device_id="reader")
        await wire.send(*(DocMessage(d, encode_sync(SyncStep.STEP1, b"\x00")) for d in DOCS))
        docs = {}
        for doc_id in DOCS:
            doc: Doc[Any] = Doc()
            doc.apply_update(await wire.doc_message(doc_id, SyncStep.STEP2))
            durable = decode_state_vector(await wire.doc_message(doc_id, SyncStep.STEP1))
            docs[doc_id] = (doc.get("fields", type=Map).to_py() or {}, doc.get_state(), durable)
    return welcome["server_seq"], docs


def missing(acked: list[Acked], docs: dict[str, Any]) -> list[Acked]:
    lost = []
    for a in acked:
        fields, state, durable = docs[a.sent.doc]
        have = decode_state_vector(state).get(a.sent.client, 0)
        vouched = durable.get(a.sent.client, 0)
        if fields.get(a.sent.key) != a.sent.value or min(have, vouched) < a.sent.clock:
            lost.append(a)
    return lost


# --- the test -------------------------------------------------------------------------------


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path, issuer: DevIssuer) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    token = issuer.issue("ada")  # an admin may create and write every work order
    keys = itertools.count()
    acked: list[Acked] = []
    stored_head = 0  # the change sequence as the last killed process left it on disk

    for kill in range(KILLS + 1):
        async with serve(data_dir, issuer) as server:
            if kill == 0:
                acked += await create_work_orders(server, token)
            # Restarted: everything acknowledged before any kill is there, and the sequence goes
            # on from where the killed process stored it.
            head, docs = await read_back(server, token)
            if kill > 0:
                assert head == stored_head, "the restarted server lost its place in the sequence"
            assert head >= max(a.seq for a in acked)
            lost = missing(acked, docs)
            assert not lost, f"{len(lost)} of {len(acked)} acked updates lost, e.g. {lost[:3]}"

            if kill < KILLS:
                moment = rng.uniform(0.0, 0.8)
                new = await stream(server, token, rng, keys, kill_after=moment)
            else:
                new = await stream(server, token, rng, keys, limit=3 * WINDOW)
                head_now, docs = await read_back(server, token)
                assert not missing(new, docs)
                assert head_now >= max(a.seq for a in new)
            assert new, "no write was acknowledged before the kill"
            assert min(a.seq for a in new) > head, "a new write got a seq already used"
            acked += new
            problems = [line for line in server.output if " ERROR " in line or "Traceback" in line]
            assert not problems, "".join(server.output)

        if kill < KILLS:
            # Killed: the file is intact, and its sequence covers every seq acknowledged.
            check, stored_head, used = await asyncio.to_thread(
                inspect_database, data_dir / "fieldsync.db"
            )
            assert check == [("ok",)], check
            assert stored_head >= max(a.seq for a in acked)
            assert used <= stored_head


# Generous: the process exits as soon as it has drained; this bound only matters on a loaded
# machine, where a tight one cut sockets before their close frame (1006 instead of 4503).
DRAIN_SECONDS = 20.0


async def test_sigterm_drains_without_losing_an_acknowledged_write(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """SIGTERM while devices stream: each is closed with 4503 after `error draining` with a
    retry hint (or reset mid-write, see below), the process exits 0 within the drain time, and
    everything acknowledged is in the database the next process opens."""
    rng = random.Random(SEED + 1)
    data_dir = tmp_path / "data"
    token = issuer.issue("ada")
    keys = itertools.count()
    async with serve(data_dir, issuer, drain_seconds=str(DRAIN_SECONDS)) as server:
        acked = await create_work_orders(server, token)
        async with contextlib.AsyncExitStack() as stack:
            writers = []
            for i in range(WRITERS):
                wire = await stack.enter_async_context(connect(server.sync_url, token))
                await wire.hello(device_id=f"drained-{i}")
                writers.append(Writer(wire, random.Random(rng.getrandbits(64)), keys, None))
            async with asyncio.TaskGroup() as group:
                for writer in writers:
                    group.create_task(writer.run())
                async with asyncio.timeout(10):
                    for writer in writers:
                        await writer.acking.wait()
                server.process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(DRAIN_SECONDS + 10):
                    code = await server.process.wait()
        # 0, not 3: the drain finished before `drain_seconds`, when the process exits anyway.
        assert code == 0, "".join(server.output)
        # (An idle device always hears the notice: test_protocol's drain test.)
        for writer in writers:
            wire = writer.wire
            told = [c for c in wire.controls if c["type"] == "error"]
            if wire.close_code == 4503:
                (notice,) = told
                assert notice["code"] == "draining"
                assert 0 < notice["retry_after"] <= 10
            else:
                # aiohttp closes the TCP connection right after its close frame when the socket
                # is idle in `receive()`; a device writing at that instant gets a reset, and its
                # asyncio transport drops the notice and the close frame it had not read yet.
                # It reconnects on its own backoff instead; nothing acknowledged is lost (below).
                assert wire.close_code == 1006, (wire.close_code, wire.ws.exception())
                assert isinstance(wire.ws.exception(), ConnectionError), wire.ws.exception()
                assert all(c["code"] == "draining" for c in told), told
            acked += writer.acked
        problems = [line for line in server.output if " ERROR " in line or "Traceback" in line]
        assert not problems, "".join(server.output)
    async with serve(data_dir, issuer) as server:
        head, docs = await read_back(server, token)
    assert head >= max(a.seq for a in acked)
    lost = missing(acked, docs)
    assert not lost, f"{len(lost)} of {len(acked)} acked updates lost, e.g. {lost[:3]}"
