"""A technician's device with 500 work orders, in TypeScript: `@fieldsync/client` over
`fieldsync.v1` beside the stock y-websocket provider over `/v1/yws`, synced cold (empty device)
and after a day offline (the supervisor edited 10% of the work orders, the device 10% others).

    .venv/bin/python bench/ts_client_sync.py [--work-orders 500]

Needs `clients/ts` built (`make test` does it) and `tests/interop/node_modules` (y-websocket).
Starts a development issuer and the server on loopback in this process, has a supervisor's
device create the work orders (title, description, five checklist items, a note), then runs
`bench/ts_client_sync.mjs` once per client. Prints one JSON line per phase and a table: bytes
are WebSocket payloads both ways, seconds are wall clock on a machine shared with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.app import AccessLogger, create_app
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.client import Client
from fieldsync.config import Settings

ROOT = Path(__file__).parent.parent
CHECKLIST = ("Check seals", "Measure vibration", "Test relief valve", "Grease bearings", "Photo")
USERS = {
    "sam": DevUser("sam", ("supervisor",), "north", "east", "Sam Supervisor"),
    "tina": DevUser("tina", ("technician",), "north", "east", "Tina Tech"),
}


def work_order(doc_id: str, n: int) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    documents.work_order.write(
        doc,
        {
            "number": f"WO-{n:05d}",
            "title": f"Inspect pump station {n}",
            "description": "Quarterly inspection: seals, bearings, vibration, and the pressure "
            "relief valve. Report anything outside tolerance with a photo.",
            "assignee": "tina",
            "team": "north",
            "region": "east",
            "status": "assigned",
            "priority": "normal",
            "site": f"Site {n % 40}",
            "due_at": "2026-12-24",
        },
        [
            {"id": f"c{i}", "label": label, "required": i < 3, "done": False}
            for i, label in enumerate(CHECKLIST)
        ],
        "Access through the north gate; the key is at the reception. ",
        by="sam",
        role="supervisor",
    )
    return doc


async def day_of_edits(sam: Client, ids: list[str], round_: int) -> None:
    """The supervisor's edits while the device is offline: 10% of the work orders."""
    for doc_id in ids[5::10]:
        doc = sam.doc(doc_id)
        with doc.transaction():
            doc.get("fields", type=Map)["priority"] = "high"
            doc.get("notes", type=Text).insert(0, f"Customer called again (day {round_}). ")
            doc.get("checklist", type=Array).append(Map({"id": f"x{round_}", "label": "Extra"}))
    await sam.wait_acked(timeout=120)


async def run_device(
    mode: str, url: str, token: str, ids_file: Path, sam: Client, ids: list[str]
) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        "node",
        str(ROOT / "bench" / "ts_client_sync.mjs"),
        mode,
        url,
        token,
        str(ids_file),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    results: list[dict[str, Any]] = []
    async for line in process.stdout:
        message = json.loads(line)
        if message.get("ready") == "offline":
            await day_of_edits(sam, ids, len(results))
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        else:
            results.append(message)
            print(json.dumps(message), flush=True)
    if await process.wait() != 0:
        raise SystemExit(f"{mode} device failed")
    return results


async def main(count: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    issuer = DevIssuer(USERS)
    await issuer.start()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(
            environ={},
            data_dir=tmp,
            oidc_issuer=issuer.issuer,
            port=0,
            # The y-websocket device holds one socket per work order, all with one token.
            max_sockets_per_subject=100_000,
        )
        runner = web.AppRunner(create_app(settings), access_log_class=AccessLogger)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        base = f"ws://127.0.0.1:{port}/v1"
        try:
            sam = Client(f"{base}/sync", issuer.issue("sam"))
            await sam.start()
            ids = [f"wo:bench-{n}" for n in range(count)]
            started = time.perf_counter()
            for n, doc_id in enumerate(ids):
                sam.doc(doc_id).apply_update(work_order(doc_id, n).get_update())
            await sam.wait_acked(timeout=300)
            print(f"created {count} work orders in {time.perf_counter() - started:.1f} s")
            ids_file = Path(tmp) / "ids.json"
            ids_file.write_text(json.dumps(ids))
            token = issuer.issue("tina")
            rows = await run_device("fieldsync", f"{base}/sync", token, ids_file, sam, ids)
            rows += await run_device("yws", f"{base}/yws", token, ids_file, sam, ids)
            await sam.close()
        finally:
            await runner.cleanup()
            await issuer.stop()
    print()
    print("| client | phase | sockets | bytes sent | bytes received | messages | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['phase']} | {r['sockets']} | {r['sent']:,} | {r['received']:,} "
            f"| {r['messages']:,} | {r['seconds']:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-orders", type=int, default=500)
    asyncio.run(main(parser.parse_args().work_orders))
    sys.exit(0)
