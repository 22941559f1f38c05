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

`--scenario s1` runs an S1-like fleet instead (bench/README.md's S1, smaller by default:
`--s1-docs` 20 work orders x `--s1-clients` 4 devices x `--s1-updates` 50 updates, paced
`--s1-interval` 0.2 s apart on average): each update is timed from its write on one device to
its arrival at each of the work order's other devices (fan-out p50 and p99; the devices of a
work order sit on different nodes, so on three nodes most arrivals cross the link from the
owner), with the server CPU of the run.

    python bench/cluster.py --scenario s1

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
import statistics
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
                    self.received(item.doc)

    def received(self, doc_id: str) -> None:
        """Called once an update or a step 2 of `doc_id` is applied (S1 times arrivals)."""

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


class PacedDevice(Device):
    """S1's device: one work order, shared with others; it writes `count` updates paced
    `interval` apart on average (exponential gaps), each stamping `fields["t-<name>"]` with its
    number, and times the arrival of the others' stamps against `sent` (the one clock of this
    process: every device lives here)."""

    def __init__(
        self, url: str, token: str, name: str, doc_id: str, sent: dict[tuple[str, int], float]
    ) -> None:
        super().__init__(url, token, name)
        self.doc_id, self.sent = doc_id, sent
        self.heard: dict[str, int] = {}  # writer -> highest stamp arrived
        self.latencies: list[float] = []

    def received(self, doc_id: str) -> None:
        now = time.perf_counter()
        fields = self.docs[doc_id].get("fields", type=Map)
        for key, value in fields.items():
            writer = key[2:]
            if not key.startswith("t-") or writer == self.name:
                continue
            # Stamps overwrite each other: one arrival may carry several (coalesced on the way).
            for n in range(self.heard.get(writer, 0) + 1, int(value) + 1):
                sent = self.sent.get((writer, n))
                if sent is not None:
                    self.latencies.append(now - sent)
            self.heard[writer] = max(self.heard.get(writer, 0), int(value))

    async def pace(self, count: int, interval: float, seed: int) -> None:
        rng = random.Random(seed)
        ydoc = self.docs[self.doc_id]
        for n in range(1, count + 1):
            await asyncio.sleep(rng.expovariate(1 / interval))
            before = ydoc.get_state()
            ydoc.get("fields", type=Map)[f"t-{self.name}"] = n
            update = ydoc.get_update(before)
            self.sent[(self.name, n)] = time.perf_counter()
            await self.send([DocMessage(self.doc_id, encode_sync(SyncStep.UPDATE, update))])


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
            if args.scenario == "s1":
                return await fleet(cluster, config, args, issuer)
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


async def fleet(
    cluster: LocalCluster, config: str, args: argparse.Namespace, issuer: DevIssuer
) -> dict[str, Any]:
    """S1-like: `--s1-docs` work orders, `--s1-clients` devices on each (spread over the nodes
    round-robin, so a work order's devices sit on different nodes), each writing
    `--s1-updates` paced updates; fan-out latency from a write to its arrival at each other
    device of the work order, and the server CPU of the run."""
    token = issuer.issue(ADMIN.subject)
    urls = cluster.sync_urls
    sent: dict[tuple[str, int], float] = {}
    doc_ids = [f"wo:s1-{n}" for n in range(args.s1_docs)]
    devices = [
        PacedDevice(urls[n % len(urls)], token, f"d{n}", doc_ids[n // args.s1_clients], sent)
        for n in range(args.s1_docs * args.s1_clients)
    ]
    async with aiohttp.ClientSession() as http:
        for device in devices:
            await device.connect(http)
        creators = devices[:: args.s1_clients]
        for creator in creators:
            creator.docs[creator.doc_id] = Doc()
            creator.docs[creator.doc_id].apply_update(new_work_order(creator.doc_id))
            update = creator.docs[creator.doc_id].get_update()
            await creator.send([DocMessage(creator.doc_id, encode_sync(SyncStep.UPDATE, update))])
        for creator in creators:
            await until(lambda c=creator: c.acks >= 1, args.timeout, "the work orders' creation")
        for device in devices:
            if device not in creators:
                await device.subscribe(device.doc_id)
        for device in devices:
            await until(lambda d=device: d.doc_id in d.synced or d in creators, 60, "subscribe")

        pids = [node.process.pid for node in cluster.members if node.process is not None]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        backends = await asyncio.to_thread(pg_backend_pids, cluster.database_url)
        pg_before = {pid: cpu_seconds(pid) for pid in backends}
        began = time.perf_counter()
        await asyncio.gather(
            *(d.pace(args.s1_updates, args.s1_interval, n) for n, d in enumerate(devices))
        )
        writers_per_doc = args.s1_clients - 1
        expected = args.s1_updates * writers_per_doc
        missing: list[str] = []
        for device in devices:
            try:
                await until(lambda d=device: len(d.latencies) >= expected, args.timeout, "fan-out")
            except TimeoutError:
                # Reported, not hidden: an update that never arrived is a bug to chase.
                missing.append(f"{device.name} on {device.url}: {len(device.latencies)}")
        wall = time.perf_counter() - began
        cpu = sum(cpu_seconds(pid) for pid in pids) - sum(cpu_before)
        pg_cpu = sum(cpu_seconds(pid) - before for pid, before in pg_before.items())
        updates = args.s1_updates * len(devices)
        latencies = sorted(lat for d in devices for lat in d.latencies)
        cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
        result: dict[str, Any] = {
            "config": config,
            "scenario": "s1",
            "nodes": len(pids),
            "sizes": f"{args.s1_docs} docs x {args.s1_clients} clients x {args.s1_updates} "
            f"updates, {args.s1_interval * 1000:.0f} ms apart",
            "updates": updates,
            "deliveries": len(latencies),
            "errors": len([e for d in devices for e in d.errors]),
            "missing": missing,
            "wall_s": round(wall, 2),
            "fanout_p50_ms": round(cuts[49] * 1000, 1),
            "fanout_p99_ms": round(cuts[98] * 1000, 1),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_update": round(cpu / updates * 1e6, 1),
            "rss_mb": [round(rss_bytes(pid) / 2**20, 1) for pid in pids],
        }
        if config != "sqlite":
            result["pg_backend_cpu_s"] = round(pg_cpu, 2)
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
    report["scenario"] = args.scenario
    if args.memory and args.scenario == "s2":
        report["memory"] = room_memory(args.memory, 50)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--window", type=int, default=32, help="unacknowledged per device")
    parser.add_argument("--configs", default="sqlite,pg1,pg3")
    parser.add_argument("--scenario", choices=["s2", "s1"], default="s2")
    parser.add_argument("--s1-docs", type=int, default=20)
    parser.add_argument("--s1-clients", type=int, default=4, help="devices per work order")
    parser.add_argument("--s1-updates", type=int, default=50, help="per device")
    parser.add_argument("--s1-interval", type=float, default=0.2, help="mean seconds apart")
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
        if args.scenario == "s1":
            print(
                f"{config:7} {r['nodes']} node(s): fan-out p50 {r['fanout_p50_ms']} ms, "
                f"p99 {r['fanout_p99_ms']} ms, server CPU {r['server_cpu_s']} s "
                f"({r['server_cpu_us_per_update']} µs/update)",
                file=sys.stderr,
            )
            continue
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
