"""`fieldsync demo`: a small run converges and says so; a second run on the same data does not
seed again; the command line knows the command."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fieldsync.demo import run_demo


async def small_demo(data_dir: Path) -> int:
    return await run_demo(
        data_dir=data_dir, port=0, work_orders=30, devices=4, rounds=2, stay=False
    )


def summary_value(out: str, label: str) -> str:
    match = re.search(rf"^  {label}\s+(.*)$", out, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{out}"
    return match.group(1)


async def test_small_demo_converges_and_a_restart_does_not_seed_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "demo"

    assert await small_demo(data_dir) == 0
    first = capsys.readouterr().out
    assert "30 work orders and 30 safety-check forms created" in first
    converged = summary_value(first, "converged")
    assert re.match(r"yes: (\d+)/\1 documents", converged), converged
    assert re.match(r"\d+ fields set on 2\+ devices at once", summary_value(first, "conflicts"))
    kept = re.search(r"(\d+)/(\d+) note lines kept", summary_value(first, "conflicts"))
    assert kept
    assert kept.group(1) == kept.group(2)
    assert int(kept.group(1)) > 0
    assert summary_value(first, "refused / resets") == "0 / 0"
    assert "60 documents" in summary_value(first, "updates stored")
    assert "x smaller" in summary_value(first, "bytes on the wire")
    # Every work order reached the demo's ERP through the outbox, and the file says so too.
    erp = summary_value(first, "ERP \\(erp_sql\\)")
    assert re.match(r"30 orders \(.*\); \d+ time confirmations", erp), erp
    assert erp.endswith("outbox: 0 still pending, 0 dead letters"), erp
    with sqlite3.connect(data_dir / "erp.db") as db:
        assert db.execute("SELECT COUNT(*) FROM pm_order").fetchone() == (30,)
        # Time stands confirmed only on completed (TECO) or closed (CLSD) orders: elsewhere each
        # confirmation has its reversal.
        standing = db.execute(
            "SELECT order_id, SUM(NOT reversal) - SUM(reversal) FROM pm_confirmation"
            " JOIN pm_order USING (order_id) WHERE status_code NOT IN ('TECO', 'CLSD')"
            " GROUP BY order_id HAVING SUM(NOT reversal) <> SUM(reversal)"
        ).fetchall()
        assert standing == []

    assert await small_demo(data_dir) == 0
    second = capsys.readouterr().out
    assert "not seeded again" in second
    assert "created offline" not in second
    assert re.match(r"yes: (\d+)/\1 documents", summary_value(second, "converged"))
    assert "60 documents" in summary_value(second, "updates stored")


def test_demo_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fieldsync", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--data-dir", "--port", "--work-orders", "--devices", "--rounds", "--exit"):
        assert option in done.stdout
