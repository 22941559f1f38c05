"""erp_sql's delivery rate to PostgreSQL: orders/s and rows/s, calling `deliver` directly (the
outbox runner and the write path in front of it are not measured here).

Each work order is completed, with 3 checklist items, 3 time entries and 2 parts: 9 rows of the
shipped mapping (pm_order, pm_operation, pm_confirmation, pm_goods_issue). Three phases, each
every order once, `--concurrency` deliveries in flight (the runner delivers documents in
parallel): `create` (new rows), `update` (the title changed: every row upserted again), `replay`
(the same seqs again: the applied-seq check alone). Also the process's CPU per delivery (the
database shares the machine's 2 cores). The rows are checked against the projection at the end.
A database of its own, `fs_erp_bench_<random>`, is created and dropped.

    .venv/bin/python bench/outbox_erp.py [--orders 500] [--concurrency 8] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fieldsync.adapters import Delivery, Table
from fieldsync.adapters._erp_sql import ErpSqlAdapter, ErpSqlConfig

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def document(i: int, title: str) -> dict[str, Any]:
    start = 1_765_000_000 + i * 10_000
    return {
        "fields": {
            "number": f"WO-{i:06d}",
            "title": title,
            "status": "completed",
            "priority": "normal",
            "assignee": f"tech-{i % 50}",
            "team": "north",
            "region": "east",
            "asset_id": f"A-{i % 997}",
            "site": "Plant 1",
            "due_at": "2026-12-24",
        },
        "checklist": [
            {"id": f"c{k}", "label": f"Step {k}", "required": True, "done": True} for k in range(3)
        ],
        "time_entries": [
            {"by": f"tech-{i % 50}", "start": start + k * 3600, "end": start + k * 3600 + 1800}
            for k in range(3)
        ],
        "parts": [{"sku": "SEAL-12", "qty": 2}, {"sku": "GASKET-7", "qty": 1}],
        "status_log": [
            {"status": status, "by": "sam", "role": "supervisor"}
            for status in ("new", "assigned", "en_route", "in_progress", "completed")
        ],
    }


async def phase(
    adapter: ErpSqlAdapter, deliveries: list[Delivery], concurrency: int
) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(delivery: Delivery) -> None:
        async with gate:
            await adapter.deliver(delivery)

    rows_before = adapter.metrics()["rows"]
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(d) for d in deliveries))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = adapter.metrics()["rows"] - rows_before
    return {
        "orders": len(deliveries),
        "seconds": round(wall, 3),
        "orders_per_s": round(len(deliveries) / wall, 1),
        "rows_per_s": round(rows / wall, 1),
        "cpu_ms_per_order": round(cpu * 1000 / len(deliveries), 3),
    }


async def run(orders: int, concurrency: int, url: str) -> dict[str, Any]:
    table = Table("bench", {"url": url, "create_schema": True}, {})
    adapter = ErpSqlAdapter("bench", ErpSqlConfig.from_table(table))
    await adapter.start()
    try:
        created = [
            Delivery("bench", f"wo:b{i}", 1, document(i, "Replace pump seal"), 1)
            for i in range(orders)
        ]
        updated = [
            Delivery("bench", d.doc, 2, document(i, "Replace pump seal and gasket"), 1)
            for i, d in enumerate(created)
        ]
        result: dict[str, Any] = {"orders": orders, "concurrency": concurrency}
        result["create"] = await phase(adapter, created, concurrency)
        result["update"] = await phase(adapter, updated, concurrency)
        result["replay"] = await phase(adapter, updated, concurrency)
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.connect() as connection:
            counts = {
                name: connection.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar()
                for name in ("pm_order", "pm_operation", "pm_confirmation", "pm_goods_issue")
            }
        engine.dispose()
        assert counts == {
            "pm_order": orders,
            "pm_operation": 3 * orders,
            "pm_confirmation": 3 * orders,
            "pm_goods_issue": 2 * orders,
        }, counts
        result["rows_per_order"] = sum(counts.values()) / orders
        return result
    finally:
        await adapter.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--server", default=SERVER, help="a database to create the bench's in")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    name = f"fs_erp_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(args.server, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        url = make_url(args.server).set(database=name).render_as_string(hide_password=False)
        result = asyncio.run(run(args.orders, args.concurrency, url))
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
