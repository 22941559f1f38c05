"""S2-like load on one node on SQLite, one node on PostgreSQL and three nodes on PostgreSQL and
Redis, in one run: server CPU per update, and the figures docs/SCALING.md plans from.

    python bench/cluster.py                       # 4,000 updates per configuration
    python bench/cluster.py --updates 1000 --configs pg3

Each configuration starts its `fieldsync serve` processes (`fieldsync.demo.LocalCluster`: real
processes, a database of its own, dropped after), then `--devices` lean v1 devices, spread over
the nodes round-robin, write `--updates` small updates between them (S2's mix: 60% a key of
`fields`, 40% an append to `notes`) into `--docs` shared work orders, as fast as the acks allow
(`--window` unacknowledged per device). Measured per configuration: wall time to the last ack,
the fieldsync processes' CPU (utime + stime from /proc, every thread) per update, the CPU of
the PostgreSQL backends serving our database per update (not the WAL writer nor the
checkpointer, which are shared), each node's RSS, and, on PostgreSQL, rows and bytes per
update (`pg_total_relation_size` of every table, and `pg_database_size`, before and after).
`--memory` adds the memory of loaded documents (rooms built in this process from a stored log).

On two cores the load generator and every node share the machine: three nodes cannot go faster
than one; what they show is the CPU per update the cluster machinery adds. Prints a table and
one JSON line (appended to `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from pycrdt import Doc, Map, Text

from fieldsync import documents
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.demo import LocalCluster
from fieldsync.replication import (
    Control,
    DocMessage,
    Room,
    SyncStep,
    YSync,
    decode_frame,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
)
from fieldsync.storage import StoredDoc

ADMIN = DevUser("ada", ("admin",), None, None, "Bench Admin")
CONFIGS = {
    "sqlite": (1, {"FIELDSYNC_DATABASE_URL": ""}),
    "pg1": (1, {}),
    "pg3": (3, {}),
}
UNLIMITED = 1 << 30


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Device:
    """One lean `/v1/sync` session: writes updates, counts acks, applies what it receives."""

    def __init__(self, url: str, token: str, name: str) -> None:
        self.url, self.token, self.name = url, token, name
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.docs: dict[str, Doc[Any]] = {}
        self.synced: set[str] = set()
        self.acks = 0
        self.errors: list[dict[str, Any]] = []
        self.acked = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, http: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        self.ws = await http.ws_connect(self.url, headers=headers, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        info = {"platform": "bench", "version": "1.0.0", "device_id": self.name}
        await self.send([Control({"type": "hello", "client": info, "since": 0, "caps": []})])

    async def send(self, messages: list[Control | DocMessage]) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(encode_frame([encode_body(m) for m in messages]))

    async def subscribe(self, doc_id: str) -> None:
        self.docs.setdefault(doc_id, Doc())
        await self.send([DocMessage(doc_id, encode_sync(SyncStep.STEP1, b"\x00"))])

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                break
            for item in decode_frame(message.data, max_frame=UNLIMITED, max_body=UNLIMITED):
                if isinstance(item, Control):
                    if item.body.get("type") == "ack":
                        self.acks += 1
                        self.acked.set()
                    elif item.body.get("type") in ("error", "reset"):
                        self.errors.append(item.body)
                    continue
                y = decode_y(item.message)
                if isinstance(y, YSync) and y.step is not SyncStep.STEP1:
                    self.docs.setdefault(item.doc, Doc()).apply_update(y.payload)
                    if y.step is SyncStep.STEP2:
                        self.synced.add(item.doc)

    async def write(self, doc_ids: list[str], count: int, window: int, seed: int) -> None:
        rng = random.Random(seed)
        sent = 0
        base = self.acks
        while sent < count:
            while sent - (self.acks - base) >= window:
                self.acked.clear()
                await self.acked.wait()
            doc_id = doc_ids[sent % len(doc_ids)]
            ydoc = self.docs[doc_id]
            before = ydoc.get_state()
            with ydoc.transaction():
                if rng.random() < 0.6:
                    ydoc.get("fields", type=Map)[f"f{rng.randrange(20)}"] = f"{self.name}-{sent}"
                else:
                    ydoc.get("notes", type=Text).insert(0, f" {self.name}-{sent}")
            update = ydoc.get_update(before)
            await self.send([DocMessage(doc_id, encode_sync(SyncStep.UPDATE, update))])
            sent += 1
        while self.acks - base < count:
            self.acked.clear()
            await self.acked.wait()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


def new_work_order(doc_id: str) -> bytes:
    doc: Doc[Any] = Doc()
    documents.work_order.write(
        doc,
        {"number": doc_id, "title": f"Bench {doc_id}", "team": "north", "region": "east"},
        [{"id": "c1", "label": "Check seals", "required": True, "done": False}],
        "",
        by=ADMIN.subject,
        role="admin",
    )
    return doc.get_update()


async def until(condition: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - another process's state, polled
            await asyncio.sleep(0.01)


def pg_sizes(url: str) -> dict[str, int]:
    """Rows and bytes of every table of the database (`pg_total_relation_size`: heap, indexes,
    TOAST), and the database's size."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        ]
        sizes: dict[str, int] = {}
        for table in tables:
            ((rows, size),) = conn.execute(
                f"SELECT (SELECT count(*) FROM {table}), pg_total_relation_size('{table}')"
            ).fetchall()
            sizes[f"{table}.rows"], sizes[f"{table}.bytes"] = int(rows), int(size)
        ((database,),) = conn.execute("SELECT pg_database_size(current_database())").fetchall()
        sizes["database.bytes"] = int(database)
    return sizes


def pg_backend_pids(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [pid for (pid,) in rows]


async def measure(config: str, args: argparse.Namespace, issuer: DevIssuer) -> dict[str, Any]:
    nodes, env = CONFIGS[config]
    port = args.port + 10 * list(CONFIGS).index(config)
    with tempfile.TemporaryDirectory(prefix=f"fs-bench-{config}-") as data:
        cluster = LocalCluster(
            issuer,
            Path(data),
            nodes=nodes,
            port=port,
            database=f"fs_bench_{config}_{secrets.token_hex(4)}",
            env={
                "FIELDSYNC_RATE": "1000000",
                "FIELDSYNC_BURST": "1000000",
                "FIELDSYNC_MAX_SOCKETS_PER_SUBJECT": "10000",
                "FIELDSYNC_LOG_LEVEL": "WARNING",
                **env,
            },
        )
        try:
            await cluster.start()
            return await load(cluster, config, args, issuer)
        finally:
            await cluster.stop()
            await asyncio.to_thread(cluster.drop_database)


async def load(
    cluster: LocalCluster, config: str, args: argparse.Namespace, issuer: DevIssuer
) -> dict[str, Any]:
    on_postgres = config != "sqlite"
    doc_ids = [f"wo:bench-{n}" for n in range(args.docs)]
    token = issuer.issue(ADMIN.subject)
    urls = cluster.sync_urls
    devices = [Device(urls[n % len(urls)], token, f"d{n}") for n in range(args.devices)]
    async with aiohttp.ClientSession() as http:
        for device in devices:
            await device.connect(http)
        creator = devices[0]
        for doc_id in doc_ids:
            creator.docs[doc_id] = Doc()
            creator.docs[doc_id].apply_update(new_work_order(doc_id))
            update = creator.docs[doc_id].get_update()
            await creator.send([DocMessage(doc_id, encode_sync(SyncStep.UPDATE, update))])
        await until(lambda: creator.acks >= len(doc_ids), 60, "the work orders' creation")
        for device in devices:
            for doc_id in doc_ids:
                if device is not creator:
                    await device.subscribe(doc_id)
        for device in devices[1:]:
            await until(lambda d=device: len(d.synced) == len(doc_ids), 60, "subscriptions")

        pids = [node.process.pid for node in cluster.members if node.process is not None]
        backends = await asyncio.to_thread(pg_backend_pids, cluster.database_url)
        sizes_before = await asyncio.to_thread(pg_sizes, cluster.database_url)
        cpu_before = [cpu_seconds(pid) for pid in pids]
        pg_before = {pid: cpu_seconds(pid) for pid in backends}
        began = time.perf_counter()
        share = args.updates // len(devices)
        stalled: list[str] = []

        async def bounded(device: Device, seed: int) -> None:
            try:
                await asyncio.wait_for(
                    device.write(doc_ids, share, args.window, seed), args.timeout
                )
            except TimeoutError:
                # Reported, not hidden: an update never acknowledged is a bug to chase.
                stalled.append(f"{device.name} on {device.url}: {device.acks} acks")

        await asyncio.gather(*(bounded(d, n) for n, d in enumerate(devices)))
        wall = time.perf_counter() - began
        cpu = sum(cpu_seconds(pid) for pid in pids) - sum(cpu_before)
        pg_cpu = sum(cpu_seconds(pid) - before for pid, before in pg_before.items())
        updates = share * len(devices)
        # Every device ends with every document's content (fan-out through the owner).
        diverged = []
        for doc_id in doc_ids:
            try:
                await until(
                    lambda doc_id=doc_id: len({_text(d.docs[doc_id]) for d in devices}) == 1,
                    args.timeout,
                    f"{doc_id} converged",
                )
            except TimeoutError:
                diverged.append(doc_id)
        errors = [e for d in devices for e in d.errors]
        result: dict[str, Any] = {
            "config": config,
            "nodes": len(pids),
            "updates": updates,
            "errors": len(errors),
            "stalled": stalled,
            "diverged": diverged,
            "wall_s": round(wall, 2),
            "updates_per_s": round(updates / wall, 1),
            "server_cpu_us_per_update": round(cpu / updates * 1e6, 1),
            "rss_mb": [round(rss_bytes(pid) / 2**20, 1) for pid in pids],
        }
        if on_postgres:
            result["pg_backend_cpu_us_per_update"] = round(pg_cpu / updates * 1e6, 1)
            after = await asyncio.to_thread(pg_sizes, cluster.database_url)
            grown = {k: after[k] - sizes_before.get(k, 0) for k in after}
            result["pg_rows_per_update"] = {
                k[:-5]: round(v / updates, 3) for k, v in grown.items() if k.endswith(".rows") and v
            }
            tables = sum(v for k, v in grown.items() if k.endswith(".bytes"))
            tables -= grown["database.bytes"]
            result["pg_bytes_per_update"] = round(tables / updates, 1)
            result["pg_database_bytes_per_update"] = round(grown["database.bytes"] / updates, 1)
            result["pg_tables_bytes"] = {
                k[:-6]: after[k] for k in after if k.endswith(".bytes") and after[k] > 16384
            }
        for device in devices:
            await device.close()
    return result


def _text(doc: Doc[Any]) -> str:
    fields = doc.get("fields", type=Map)
    return str(doc.get("notes", type=Text)) + json.dumps(dict(fields), sort_keys=True, default=str)


def room_memory(count: int, edits: int) -> dict[str, float]:
    """Memory per loaded document: `count` rooms built from stored logs of a work order and
    `edits` small updates each (what a node holds per document in memory), by RSS growth."""
    rng = random.Random(7)
    stored = []
    for n in range(count):
        doc: Doc[Any] = Doc()
        doc.apply_update(new_work_order(f"wo:m{n}"))
        updates = [doc.get_update()]
        for i in range(edits):
            state = doc.get_state()
            if rng.random() < 0.6:
                doc.get("fields", type=Map)[f"f{rng.randrange(20)}"] = f"v{i}"
            else:
                doc.get("notes", type=Text).insert(0, f" note {i}")
            updates.append(doc.get_update(state))
        stored.append(StoredDoc(None, updates, len(updates), None))
    gc.collect()
    before = rss_bytes(os.getpid())
    rooms = [Room(f"wo:m{n}", s) for n, s in enumerate(stored)]
    gc.collect()
    grown = rss_bytes(os.getpid()) - before
    size = sum(len(room.ydoc.get_update()) for room in rooms) / len(rooms)
    return {
        "rooms": count,
        "edits_each": edits,
        "kib_per_room": round(grown / count / 1024, 1),
        "state_bytes_per_doc": round(size),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"run": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}
    report["loadavg_1m"] = os.getloadavg()[0]
    async with DevIssuer({ADMIN.subject: ADMIN}, host="127.0.0.1", port=args.port - 1) as issuer:
        for config in args.configs.split(","):
            result = await measure(config, args, issuer)
            print(json.dumps(result), file=sys.stderr, flush=True)
            report[config] = result
    if args.memory:
        report["memory"] = room_memory(args.memory, 50)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--window", type=int, default=32, help="unacknowledged per device")
    parser.add_argument("--configs", default="sqlite,pg1,pg3")
    parser.add_argument("--port", type=int, default=27001)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    parser.add_argument("--memory", type=int, default=2000, help="rooms to build (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster.jsonl"))
    args = parser.parse_args()
    report = asyncio.run(run(args))
    line = json.dumps(report)
    print(line)
    with args.out.open("a") as out:
        out.write(line + "\n")
    base = report.get("sqlite", {}).get("server_cpu_us_per_update")
    for config in args.configs.split(","):
        r = report[config]
        ratio = f" ({r['server_cpu_us_per_update'] / base:.2f} x sqlite)" if base else ""
        print(
            f"{config:7} {r['nodes']} node(s): {r['updates_per_s']:8.1f} updates/s, "
            f"server CPU {r['server_cpu_us_per_update']:7.1f} µs/update{ratio}, "
            f"PostgreSQL backends {r.get('pg_backend_cpu_us_per_update', '-')} µs/update",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
