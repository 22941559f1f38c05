"""A burst of erp_sql deliveries in a process of its own, to be killed with SIGKILL mid-way:
`python -m tests.adapters.erp_burst URL COUNT` prints `delivered <doc>` after each delivery."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from fieldsync.adapters import Delivery, Table
from fieldsync.adapters._erp_sql import ErpSqlAdapter, ErpSqlConfig


def burst_delivery(i: int) -> Delivery:
    """Order `i`, completed with its time and parts: 1 + 1 + 3 + 2 rows."""
    document: dict[str, Any] = {
        "fields": {"title": f"Order {i}", "status": "completed"},
        "checklist": [{"id": "c1", "label": "Isolate", "required": True, "done": True}],
        "time_entries": [
            {"by": "tina", "start": 1000 * i + 100 * k, "end": 1000 * i + 100 * k + 60}
            for k in range(3)
        ],
        "parts": [{"sku": "A", "qty": i}, {"sku": "B", "qty": 1}],
        "status_log": [{"status": "in_progress"}, {"status": "completed"}],
    }
    return Delivery("erp", f"wo:k{i}", 1, document, 1)


def adapter(url: str) -> ErpSqlAdapter:
    table = Table("erp", {"url": url, "create_schema": True}, {})
    return ErpSqlAdapter("erp", ErpSqlConfig.from_table(table))


async def main(url: str, count: int) -> None:
    erp = adapter(url)
    await erp.start()
    gate = asyncio.Semaphore(6)

    async def one(i: int) -> None:
        async with gate:
            await erp.deliver(burst_delivery(i))
            print(f"delivered wo:k{i}", flush=True)

    await asyncio.gather(*(one(i) for i in range(count)))
    await erp.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
