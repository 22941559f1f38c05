"""The demo's ERP: a SQLite file in the demo's data folder that the `erp_sql` adapter projects
work orders into, through the outbox, as it would into a plant-maintenance system's database; and
what landed there, for the summary."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from fieldsync.storage import Backend

ADAPTER = "erp"
FILE = "erp.db"
_WAIT = 60.0  # seconds the summary waits for the outbox to deliver what the demo committed


def section(data_dir: Path) -> str:
    """The ERP's section of the demo's adapters file: its SQLite file beside the server's."""
    url = f"sqlite:///{(data_dir / FILE).resolve()}"
    return (
        "# The completed work orders' confirmations and goods issues land in an ERP-style\n"
        "# schema in a SQLite file (README: erp_sql and erp_http).\n"
        f'[adapters.{ADAPTER}]\nkind = "erp_sql"\nurl = "{url}"\ncreate_schema = true\n'
    )


@dataclass(frozen=True)
class Landed:
    """What the ERP holds: orders by status code, confirmations and goods issues (reversals
    apart), and what the outbox still owes or gave up on."""

    orders: dict[str, int]
    confirmations: int
    reversals: int
    goods_issues: int
    pending: int
    dead: int
    path: Path

    def lines(self) -> list[str]:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.orders.items())) or "none"
        owed = f"{self.pending} still pending, {self.dead} dead letters"
        return [
            f"  ERP (erp_sql)         {sum(self.orders.values())} orders ({codes}); "
            f"{self.confirmations} time confirmations ({self.reversals} reversed), "
            f"{self.goods_issues} goods issues; outbox: {owed}",
            f"  look at the ERP       sqlite3 {self.path} 'SELECT status_code, COUNT(*) "
            "FROM pm_order GROUP BY 1'",
        ]


async def landed(backend: Backend, data_dir: Path) -> Landed:
    """Wait (bounded) until the outbox owes the ERP nothing, then read what landed."""
    deadline = time.monotonic() + _WAIT
    while True:
        stats = (await backend.outbox.stats()).get(ADAPTER)
        pending = stats.pending if stats else 0
        if pending == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    dead = stats.dead if stats else 0
    path = data_dir / FILE
    return await asyncio.to_thread(_read, path, pending, dead)


def _read(path: Path, pending: int, dead: int) -> Landed:
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        orders = dict(db.execute("SELECT status_code, COUNT(*) FROM pm_order GROUP BY 1"))
        ((confirmed, reversed_),) = db.execute(
            "SELECT COUNT(*) - COALESCE(SUM(reversal), 0), COALESCE(SUM(reversal), 0)"
            " FROM pm_confirmation"
        )
        ((issues,),) = db.execute("SELECT COUNT(*) FROM pm_goods_issue WHERE NOT reversal")
    return Landed(orders, confirmed, reversed_, issues, pending, dead, path)
