"""What one subscribed outbound adapter costs the device write path, and the outbox's lag under
a steady device load (issue: the integration layer, part 1).

    .venv/bin/python bench/outbox_load.py [--updates 3000] [--reps 3] [--rate 1000] [--seconds 10]

1. Cost: durable updates/s of technicians' edits through the replicator's one write path (as
   `write_path.py` measures them) with no adapter, and with an `erp_sql` adapter on PostgreSQL
   subscribed to work orders and its outbox runner delivering while the edits arrive (the outbox
   entries are written in the updates' own transactions; the runner and the database share the
   machine's 2 cores with the write path). Runs alternate, so both see the same machine.
2. Lag: edits offered at `--rate` per second for `--seconds`, the runner delivering to the same
   target: the oldest pending entry's age sampled every 0.25 s (p50, max), and how long after
   the last commit the outbox is empty.

A database of its own, `fs_outbox_bench_<random>`, is created on the loopback PostgreSQL and
dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from write_path import Device, workload

from fieldsync.adapters import AdapterContext, OutboundAdapter, OutboxRunner, Table, build_adapter
from fieldsync.auth import Principal, Role
from fieldsync.records import ScopeFilter, ScopeKind
from fieldsync.replication import Replicator, Room
from fieldsync.storage import SQLiteBackend

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Bench:
    """One store, replicator and (optionally) adapter + runner, with the work orders seeded."""

    def __init__(self, tmp: Path, target: str | None, name: str) -> None:
        self.backend = SQLiteBackend(tmp / f"{name}.db")
        self.replicator = Replicator(self.backend.store)
        self.target, self.name = target, name
        self.runner: OutboxRunner | None = None
        self.adapter: OutboundAdapter | None = None
        self.tina = Device(Principal("tina", frozenset({Role.TECHNICIAN}), team="north"))
        self.rooms: dict[str, Room] = {}
        self.tmp = tmp

    async def open(self, seeds: list[tuple[str, bytes]]) -> None:
        await self.backend.open()
        if self.target is not None:
            table = Table(self.name, {"kind": "erp_sql", "url": self.target, "create_schema": True})
            context = AdapterContext(self.tmp, self.backend.outbox, self.backend.reference)
            adapter = build_adapter(table, context)
            assert isinstance(adapter, OutboundAdapter)
            self.adapter = adapter
            self.runner = OutboxRunner(self.backend.outbox, self.backend.store, [adapter])
            await adapter.start()
            await self.runner.start()
        boss = Device(Principal("sam", frozenset({Role.SUPERVISOR}), team="north", region="east"))
        boss.scope = ScopeFilter(ScopeKind.TEAM, "north")
        for doc_id, update in seeds:
            room = await self.replicator.subscribe(boss, doc_id)
            done = (await self.replicator.submit(boss, room, update)).committed
            assert done is not None
            await done
        self.rooms = {d: await self.replicator.subscribe(self.tina, d) for d, _ in seeds}

    async def pending(self) -> tuple[int, float | None]:
        stats = (await self.backend.outbox.stats()).get(self.name)
        if stats is None:
            return 0, None
        return stats.pending, stats.oldest_pending_at

    async def drained(self, limit: float = 120.0) -> float:
        """Seconds until the outbox owes the target nothing."""
        began = time.perf_counter()
        while (await self.pending())[0] and time.perf_counter() - began < limit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the outbox's state, polled as an operator would
        return time.perf_counter() - began

    async def close(self) -> None:
        if self.runner is not None and self.adapter is not None:
            await self.runner.stop()
            await self.adapter.stop()
        await self.replicator.stop()
        await self.backend.close()


async def submit_all(
    bench: Bench, edits: list[tuple[str, bytes]], rate: float | None = None
) -> float:
    """Submit `edits` with 8 in flight (8 devices each waiting for its ack), at most `rate` per
    second; return durable updates per second."""
    started = time.perf_counter()
    pending: list[asyncio.Future[Any]] = []
    for n, (doc_id, update) in enumerate(edits):
        if rate is not None:
            ahead = started + n / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
        submitted = await bench.replicator.submit(bench.tina, bench.rooms[doc_id], update)
        if submitted.committed is not None:
            pending.append(submitted.committed)
        if len(pending) >= 8:
            await pending.pop(0)
    await asyncio.gather(*pending)
    return len(edits) / (time.perf_counter() - started)


async def cost(target: str, docs: int, updates: int, reps: int) -> None:
    seeds, edits = workload(docs, updates)
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for subscribed in (False, True):
                name = f"erp{rep}" if subscribed else f"none{rep}"
                bench = Bench(Path(tmp), target if subscribed else None, name)
                await bench.open(seeds)
                rates[subscribed].append(await submit_all(bench, edits))
                if subscribed:
                    await bench.drained()
                await bench.close()
    without, with_ = (statistics.median(rates[s]) for s in (False, True))
    print(f"cost: {updates} edits on {docs} work orders, {reps} reps alternating")
    for subscribed, label in ((False, "no adapter"), (True, "erp_sql subscribed")):
        figures = ", ".join(f"{r:,.0f}" for r in rates[subscribed])
        print(f"  {label:>18}: durable updates/s [{figures}]")
    print(f"  ratio with/without: {with_ / without:.2f} (target at least 0.90)")


async def lag(target: str, docs: int, rate: float, seconds: float) -> None:
    seeds, edits = workload(docs, int(rate * seconds))
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), target, "lag")
        await bench.open(seeds)
        await bench.drained()
        samples: list[float] = []

        async def sample() -> None:
            while True:
                _, oldest = await bench.pending()
                samples.append(0.0 if oldest is None else max(0.0, time.time() - oldest))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        achieved = await submit_all(bench, edits, rate)
        drain = await bench.drained()
        sampler.cancel()
        await bench.close()
    samples.sort()
    p50 = samples[len(samples) // 2] if samples else 0.0
    print(f"lag: {len(edits)} edits offered at {rate:,.0f}/s ({achieved:,.0f}/s achieved)")
    print(f"  oldest pending age: p50 {p50:.2f} s, max {max(samples, default=0.0):.2f} s")
    print(f"  outbox empty {drain:.2f} s after the last commit")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--server", default=SERVER, help="a database to create the bench's in")
    args = parser.parse_args()
    name = f"fs_outbox_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(args.server, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    target = sa.make_url(args.server).set(database=name).render_as_string(hide_password=False)
    try:
        await cost(target, args.docs, args.updates, args.reps)
        await lag(target, args.docs, args.rate, args.seconds)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
