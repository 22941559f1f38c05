"""Bytes per screen for a technician with 200 assigned work orders (issue 5).

    .venv/bin/python bench/screens_bytes.py [--work-orders 200]

Starts a development issuer and the server on loopback in this process, has the supervisor create
the work orders over `POST /v1/work-orders` (the demo's realistic content: titles, descriptions,
checklists, notes), imports the assets' reference rows, then
measures what the technician's app receives:

- `my-work`, first page (the default page size), per content coding, against the naive
  alternative: the full JSON of the same work orders (`GET /v1/work-orders/{id}` each),
  uncompressed. Target: at most 1/20.
- a revalidation of that page with `If-None-Match`: 304 and no body.
- the other screens, for scale.

Bytes are the response bodies as sent (Content-Length); the header block is shown beside them.
Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from datetime import date

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from fieldsync.app import BACKEND, AccessLogger, create_app
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.config import Settings
from fieldsync.demo import _dataset

TECHNICIAN = DevUser("aino", ("technician",), "north", "east", "Aino Virtanen")
SUPERVISOR = DevUser("sam", ("supervisor",), "north", "east", "Sam Supervisor")
TARGET = 1 / 20


class Measured:
    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def header_bytes(self) -> int:
        # "HTTP/1.1 200 OK\r\n", "Name: value\r\n" each, and the blank line.
        return 17 + sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 2


async def fetch(http: aiohttp.ClientSession, url: str, token: str, **headers: str) -> Measured:
    sent = {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity", **headers}
    async with http.get(url, headers=sent) as response:
        return Measured(response.status, CIMultiDict(response.headers), await response.read())


async def seed(base: str, http: aiohttp.ClientSession, token: str, count: int) -> list[str]:
    today = date.today()
    ids = []
    for i in range(count):
        wo = _dataset.work_order(i, today)
        fields = {**wo.fields, "assignee": TECHNICIAN.subject, "status": "assigned"}
        fields["team"], fields["region"] = SUPERVISOR.team, SUPERVISOR.region
        checklist = [
            {"id": c["id"], "label": c["label"], "required": c["required"]} for c in wo.checklist
        ]
        body = {"id": wo.doc_id, "fields": fields, "checklist": checklist, "notes": wo.notes}
        async with http.post(
            base + "/v1/work-orders", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            if response.status != 201:
                raise SystemExit(f"creating {wo.doc_id}: {response.status} {await response.text()}")
        ids.append(wo.doc_id)
    return ids


async def add_assets(app: web.Application, count: int) -> None:
    today = date.today()
    rows = {}
    for i in range(count):
        asset_id = _dataset.work_order(i, today).fields["asset_id"]
        rows[asset_id] = {"name": f"Asset {asset_id}", "maker": "Grundfos", "installed": 2019}
    imported = [{"id": key, **data} for key, data in rows.items()]
    await app[BACKEND].reference.import_rows("assets", imported, full=False)


async def run(count: int) -> int:
    # The development issuer has no authorization endpoint; the server says so at start.
    logging.getLogger("fieldsync.api.auth").setLevel(logging.ERROR)
    users = {u.subject: u for u in (TECHNICIAN, SUPERVISOR)}
    issuer = DevIssuer(users)
    await issuer.start()
    failures = []
    with tempfile.TemporaryDirectory() as data:
        settings = Settings.load(
            environ={}, data_dir=data, oidc_issuer=issuer.issuer, port=0, log_level="WARNING"
        )
        app = create_app(settings)
        runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=2)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        tech, boss = issuer.issue(TECHNICIAN.subject), issuer.issue(SUPERVISOR.subject)
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as http:
                await seed(base, http, boss, count)
                await add_assets(app, count)
                my_work = base + "/v1/screens/my-work"
                plain = await fetch(http, my_work, tech)
                page = json.loads(plain.body)["items"]
                codings = {
                    c: await fetch(http, my_work, tech, **{"Accept-Encoding": c})
                    for c in ("gzip", "zstd", "br")
                }
                full = [
                    await fetch(http, f"{base}/v1/work-orders/{card['id']}", tech) for card in page
                ]
                naive = sum(len(m.body) for m in full)
                every = 0
                cursor: str | None = None
                first = True
                while first or cursor:
                    first = False
                    url = my_work + "?limit=200" + (f"&cursor={cursor}" if cursor else "")
                    listing = json.loads((await fetch(http, url, tech)).body)
                    for card in listing["items"]:
                        every += len(
                            (await fetch(http, f"{base}/v1/work-orders/{card['id']}", tech)).body
                        )
                    cursor = listing["next"]
                best = codings["br"]
                again = await fetch(
                    http,
                    my_work,
                    tech,
                    **{"Accept-Encoding": "br", "If-None-Match": best.headers["ETag"]},
                )
                detail = page[0]["id"]
                others = {
                    "work-order detail (one)": base + f"/v1/screens/work-order/{detail}",
                    "team-queue, first page (supervisor)": base + "/v1/screens/team-queue",
                }
                other_sizes = {}
                for name, url in others.items():
                    token = boss if "supervisor" in name else tech
                    other_sizes[name] = (
                        len((await fetch(http, url, token)).body),
                        len((await fetch(http, url, token, **{"Accept-Encoding": "br"})).body),
                    )
        finally:
            await runner.cleanup()
            await issuer.stop()

    ratio = len(best.body) / naive
    print(
        f"technician with {count} assigned work orders; my-work first page: {len(page)} cards"
        " (asset names from reference data)"
    )
    print()
    print(f"{'response':52} {'body B':>9} {'headers B':>10}")
    print(f"{'my-work page, identity':52} {len(plain.body):>9} {plain.header_bytes:>10}")
    for coding, measured in codings.items():
        print(f"{'my-work page, ' + coding:52} {len(measured.body):>9} {measured.header_bytes:>10}")
    print(
        f"{'naive: full JSON of the same ' + str(len(page)) + ' work orders, identity':52}"
        f" {naive:>9} {'':>10}"
    )
    print(f"{'naive: full JSON of all ' + str(count) + ' work orders, identity':52} {every:>9}")
    print(
        f"{'my-work revalidation (If-None-Match), ' + str(again.status):52}"
        f" {len(again.body):>9} {again.header_bytes:>10}"
    )
    for name, (identity, br) in other_sizes.items():
        print(f"{name + ', identity / br':52} {identity:>9} / {br}")
    print()
    print(
        f"my-work br / naive (same work orders): 1/{naive / len(best.body):.1f} = {ratio:.4f}"
        f" (target <= 1/{1 / TARGET:.0f})"
    )
    print(f"my-work br / naive (all {count}): 1/{every / len(best.body):.1f}")
    if ratio > TARGET:
        failures.append(f"ratio {ratio:.4f} above {TARGET:.4f}")
    if again.status != 304 or again.body:
        failures.append(f"revalidation answered {again.status} with {len(again.body)} B")
    for failure in failures:
        print("MISSED:", failure)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--work-orders", type=int, default=200)
    args = parser.parse_args()
    return asyncio.run(run(args.work_orders))


if __name__ == "__main__":
    sys.exit(main())
