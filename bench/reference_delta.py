"""Reference data delta sync (issue 4): what a device downloads when 1% of an asset registry
changes, against what a full snapshot costs, measured in one run.

A 100,000-asset registry is imported through `PUT /v1/reference/assets` (JSON lines, as an
adapter sends it). A device (`fieldsync.client.ReferenceReplica`, the technician's role) downloads
the snapshot, then 1% of the rows change one field each (a status, a running-hours reading or a
service date, as the ERP and the OPC UA adapters would change them) and the adapter imports the
whole registry again. The device then asks for the changes since its snapshot. Figures:

- delta / snapshot bytes, both as they travel (compressed: zstd, and gzip for clients without
  zstd); the target is at most 0.02;
- the time the device waits for the delta (every page, over loopback, client included), and the
  server's own time to read it from storage; the target is well under a second;
- the time of the full re-import that found the 1% (its field-level diff of 100,000 rows).

The device's rows are checked against the server's at the end. One process, loopback only: a
development OpenID issuer and the server, as `tests/harness.py` runs them.

    .venv/bin/python bench/reference_delta.py [--rows 100000] [--changed 0.01] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import zstandard
from aiohttp import web

from fieldsync.app import REFERENCE, AccessLogger, configure_logging, create_app
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.client import ReferenceReplica
from fieldsync.config import Settings
from fieldsync.storage import SnapshotHead

ADAPTER = DevUser("erp-adapter", ("admin",), None, None, "ERP adapter")
DEVICE = DevUser("tech-1", ("technician",), "north", "east", "Technician")
USERS = {user.subject: user for user in (ADAPTER, DEVICE)}

MAX_RATIO = 0.02
MAX_DELTA_SECONDS = 1.0

KINDS = {
    "pump": ("Grundfos", "KSB", "Flowserve"),
    "valve": ("Emerson", "Flowserve", "Samson"),
    "motor": ("ABB", "Siemens", "WEG"),
    "compressor": ("Atlas Copco", "Ingersoll Rand", "Kaeser"),
    "transformer": ("Siemens", "Schneider", "Hitachi"),
}
STATUSES = ("in_service", "standby", "out_of_service", "under_repair")


def registry(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """An asset registry as an ERP exports it: ids, names, where, what, serials, dates."""
    rows = []
    first = date(2005, 1, 1)
    for i in range(count):
        kind = rng.choice(list(KINDS))
        maker = rng.choice(KINDS[kind])
        site = rng.randrange(400)
        rows.append(
            {
                "id": f"AS-{i:07d}",
                "name": f"{kind.capitalize()} {site:03d}-{rng.randrange(10_000):04d}",
                "kind": kind,
                "manufacturer": maker,
                "model": f"{maker[:3].upper()}-{rng.randrange(100, 999)}",
                "serial": f"{rng.getrandbits(40):010X}",
                "site": f"site-{site:03d}",
                "area": f"A{rng.randrange(1, 30):02d}",
                "parent": f"AS-{rng.randrange(count):07d}" if rng.random() < 0.3 else None,
                "installed": (first + timedelta(days=rng.randrange(7000))).isoformat(),
                "last_service": (date(2026, 1, 1) - timedelta(days=rng.randrange(900))).isoformat(),
                "criticality": rng.choice("ABC"),
                "status": rng.choices(STATUSES, weights=(90, 6, 2, 2))[0],
                "running_hours": rng.randrange(100_000),
                "lat": round(rng.uniform(47.0, 55.0), 5),
                "lon": round(rng.uniform(6.0, 15.0), 5),
            }
        )
    return rows


def change_one_field(rows: list[dict[str, Any]], share: float, rng: random.Random) -> int:
    changed = rng.sample(range(len(rows)), round(len(rows) * share))
    for i in changed:
        row = rows[i]
        field = rng.choice(("status", "running_hours", "last_service"))
        if field == "status":
            row["status"] = rng.choice([s for s in STATUSES if s != row["status"]])
        elif field == "running_hours":
            row["running_hours"] += rng.randrange(1, 500)
        else:
            row["last_service"] = date(2026, 6, 1).isoformat()
    return len(changed)


def json_lines(rows: list[dict[str, Any]]) -> Iterator[bytes]:
    batch = 2000
    for start in range(0, len(rows), batch):
        yield b"".join(orjson.dumps(row) + b"\n" for row in rows[start : start + batch])


async def put(http: aiohttp.ClientSession, url: str, token: str, rows: list[dict[str, Any]]) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}

    async def body() -> Any:
        for chunk in json_lines(rows):
            yield chunk

    async with http.put(url, data=body(), headers=headers) as response:
        response.raise_for_status()
        return await response.json()


async def snapshot_bytes(http: aiohttp.ClientSession, url: str, token: str, coding: str) -> int:
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": coding}
    async with http.get(url, headers=headers, auto_decompress=False) as response:
        response.raise_for_status()
        assert response.headers.get("Content-Encoding") == coding
        return len(await response.read())


async def delta_bytes(
    http: aiohttp.ClientSession, url: str, token: str, since: int, coding: str
) -> tuple[int, int]:
    """(bytes, pages) of every changes page after `since` in one coding."""
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": coding}
    total = pages = 0
    while True:
        async with http.get(
            url, params={"since": str(since)}, headers=headers, auto_decompress=False
        ) as response:
            response.raise_for_status()
            body = await response.read()
            total += len(body)
            pages += 1
            page = orjson.loads(
                body if response.headers.get("Content-Encoding") is None else _decoded(body, coding)
            )
        since = page["next"]
        if not page["more"]:
            return total, pages


def _decoded(body: bytes, coding: str) -> bytes:
    if coding == "zstd":
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(body))
    return zlib.decompress(body, 16 + zlib.MAX_WBITS)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    issuer = DevIssuer(USERS)
    await issuer.start()
    with tempfile.TemporaryDirectory(prefix="fieldsync-refbench-") as data:
        settings = Settings.load(
            environ={}, data_dir=data, oidc_issuer=issuer.issuer, port=0, log_level="WARNING"
        )
        app = create_app(settings)
        runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        adapter = issuer.issue(ADAPTER.subject, ttl=3600)
        device_token = issuer.issue(DEVICE.subject, ttl=3600)
        dataset_url = base + "/v1/reference/assets"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                rows = registry(args.rows, rng)
                started = time.perf_counter()
                first = await put(http, dataset_url, adapter, rows)
                import_seconds = time.perf_counter() - started
                assert first["created"] == args.rows, first

                device = ReferenceReplica("assets")
                initial = await device.sync(http, base, device_token)
                assert initial.snapshots == 1
                assert len(device.rows) == args.rows
                since = device.since
                assert since is not None
                snapshot = {
                    coding: await snapshot_bytes(
                        http, dataset_url + "/snapshot", device_token, coding
                    )
                    for coding in ("zstd", "gzip")
                }

                changed = change_one_field(rows, args.changed, rng)
                started = time.perf_counter()
                second = await put(http, dataset_url, adapter, rows)
                reimport_seconds = time.perf_counter() - started
                assert (second["updated"], second["created"], second["deleted"]) == (
                    changed,
                    0,
                    0,
                ), second

                # What the device waits for: every page of the delta, decoded and applied.
                started = time.perf_counter()
                delta = await device.sync(http, base, device_token)
                delta_seconds = time.perf_counter() - started
                assert delta.snapshots == 0
                delta_by_coding = {
                    coding: await delta_bytes(
                        http, dataset_url + "/changes", device_token, since, coding
                    )
                    for coding in ("zstd", "gzip")
                }
                # The same delta again, several times: the spread of the answer time.
                repeats = []
                for _ in range(args.repeats):
                    again = ReferenceReplica("assets", since=since)
                    started = time.perf_counter()
                    await again.sync(http, base, device_token)
                    repeats.append(time.perf_counter() - started)
                # The server's own share: reading the pages from storage.
                store = app[REFERENCE].store
                started = time.perf_counter()
                page_since: int = since
                while True:
                    page = await store.changes("assets", page_since, settings.reference_page)
                    page_since = page.next
                    if not page.more:
                        break
                storage_seconds = time.perf_counter() - started

                def take(head: SnapshotHead, stored: Iterator[tuple[str, str]]) -> dict[str, Any]:
                    return {key: orjson.loads(data) for key, data in stored}

                assert device.rows == await store.snapshot("assets", take), "device diverged"
        finally:
            await runner.cleanup()
            await issuer.stop()

    ratio = {c: delta_by_coding[c][0] / snapshot[c] for c in snapshot}
    return {
        "bench": "reference_delta",
        "rows": args.rows,
        "changed_rows": changed,
        "import_rows_per_s": round(args.rows / import_seconds),
        "reimport_1pct_s": round(reimport_seconds, 3),
        "snapshot_bytes": snapshot,
        "delta_bytes": {c: delta_by_coding[c][0] for c in delta_by_coding},
        "delta_pages": delta_by_coding["zstd"][1],
        "delta_over_snapshot": {c: round(r, 5) for c, r in ratio.items()},
        "delta_device_s": round(delta_seconds, 4),
        "delta_device_median_s": round(statistics.median(repeats), 4) if repeats else None,
        "delta_device_max_s": round(max(repeats), 4) if repeats else None,
        "delta_storage_s": round(storage_seconds, 4),
        "delta_received_by_device": delta.changes_bytes,
        "pass": all(r <= MAX_RATIO for r in ratio.values())
        and max([delta_seconds, *repeats]) < MAX_DELTA_SECONDS,
    }


def report(result: dict[str, Any]) -> None:
    rows, changed = result["rows"], result["changed_rows"]
    print(f"reference delta sync: {rows:,} assets, {changed:,} rows changed one field each")
    for coding in ("zstd", "gzip"):
        delta, full = result["delta_bytes"][coding], result["snapshot_bytes"][coding]
        print(
            f"  {coding:4}  delta {delta:>10,} B / snapshot {full:>10,} B"
            f" = {result['delta_over_snapshot'][coding]:.4f}  (target <= {MAX_RATIO})"
        )
    print(
        f"  delta answered to the device in {result['delta_device_s'] * 1000:.1f} ms"
        f" ({result['delta_pages']} page(s); median of repeats"
        f" {(result['delta_device_median_s'] or 0) * 1000:.1f} ms, max"
        f" {(result['delta_device_max_s'] or 0) * 1000:.1f} ms; target < {MAX_DELTA_SECONDS} s),"
        f" of which storage {result['delta_storage_s'] * 1000:.1f} ms"
    )
    print(
        f"  import {result['import_rows_per_s']:,} rows/s; re-import finding the"
        f" {changed:,} changes: {result['reimport_1pct_s']:.2f} s"
    )
    print("  PASS" if result["pass"] else "  FAIL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of rows changed")
    parser.add_argument("--repeats", type=int, default=5, help="extra timings of the delta")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", type=Path, help="append the figures as one JSON line here")
    args = parser.parse_args()
    configure_logging("ERROR")  # the figures only
    result = asyncio.run(run(args))
    report(result)
    if args.json is not None:
        with args.json.open("a") as out:
            out.write(json.dumps(result) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
