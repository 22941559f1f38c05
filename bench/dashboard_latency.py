"""Dashboard latency: from a device's commit to the dashboards' `view_changes`, and the server CPU
the live views add per update.

A server (its own process, on SQLite in a temporary folder, with a development issuer) holds
TEAMS teams of technicians, one work order each. DEVICES technicians' devices (lean
`fieldsync.v1` connections) move their work order between `in_progress` and `on_hold`, each every
PERIOD seconds on average (jittered). Phase A runs with no dashboard; phase B with DASHBOARDS
supervisors' dashboards subscribed to their team's `team-queue` (two per team: feeds are shared
per team and scope). Measured in phase B, for every card change a dashboard receives: the time
from the device's ack (sent once the update is committed) to the `view_changes` that shows the
new status (and from the send, an upper bound); and the server process's CPU per update in each
phase (from /proc), whose difference is what the views cost.

    python bench/dashboard_latency.py [--devices 200] [--dashboards 20] [--seconds 15]

Prints one JSON line. Loopback only; the load generator and the server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from pycrdt import Doc

from fieldsync import documents
from fieldsync.replication import (
    Control,
    DocMessage,
    SyncStep,
    YSync,
    decode_frame,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
)

UNLIMITED = 1 << 30


# --- the server, in its own process --------------------------------------------------------------


async def serve(devices: int, teams: int, dashboards: int) -> None:
    from aiohttp import web

    from fieldsync.app import create_app
    from fieldsync.auth import DevIssuer, DevUser
    from fieldsync.config import Settings

    users = {}
    for n in range(devices):
        users[f"t{n}"] = DevUser(f"t{n}", ("technician",), f"team{n % teams}", "east")
    for n in range(dashboards):
        users[f"s{n}"] = DevUser(f"s{n}", ("supervisor",), f"team{n % teams}", "east")
    async with DevIssuer(users, token_ttl=24 * 3600) as issuer:
        folder = tempfile.mkdtemp(prefix="fieldsync-dashboard-bench-")
        settings = Settings.load(
            environ={},
            data_dir=folder,
            oidc_issuer=issuer.issuer,
            port=0,
            rate=100_000.0,
            burst=100_000.0,
            log_level="WARNING",
        )
        runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=2)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        tokens = {name: issuer.issue(user.subject) for name, user in users.items()}
        print(json.dumps({"port": port, "pid": os.getpid(), "tokens": tokens}), flush=True)
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- a lean v1 connection ------------------------------------------------------------------------


class Conn:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, name: str) -> None:
        self.ws = ws
        self.name = name
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.step2: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.on_control: Any = None

    async def send(self, *messages: Control | DocMessage) -> None:
        await self.ws.send_bytes(encode_frame([encode_body(m) for m in messages]))

    async def read(self) -> None:
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                break
            for item in decode_frame(message.data, max_frame=UNLIMITED, max_body=UNLIMITED):
                if isinstance(item, Control):
                    kind = item.body.get("type", "")
                    if self.on_control is not None:
                        self.on_control(item.body, time.perf_counter())
                    waiter = self.waiters.pop(kind, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(item.body)
                else:
                    y = decode_y(item.message)
                    if isinstance(y, YSync) and y.step is SyncStep.STEP2 and not self.step2.done():
                        self.step2.set_result(y.payload)

    def expect(self, kind: str) -> asyncio.Future[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        self.waiters[kind] = future
        return future


async def connect(http: aiohttp.ClientSession, url: str, token: str, name: str) -> Conn:
    ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}, max_msg_size=0)
    conn = Conn(ws, name)
    asyncio.get_running_loop().create_task(conn.read())
    welcome = conn.expect("welcome")
    client = {"platform": "bench", "version": "1.0.0", "device_id": name}
    await conn.send(Control({"type": "hello", "client": client, "since": None, "caps": []}))
    await asyncio.wait_for(welcome, 30)
    return conn


# --- the load ------------------------------------------------------------------------------------


class Device:
    def __init__(self, conn: Conn, doc_id: str, subject: str) -> None:
        self.conn = conn
        self.doc_id = doc_id
        self.subject = subject
        self.doc: Doc[Any] = Doc()
        self.status = "in_progress"
        self.sent: dict[str, float] = {}  # status -> when its move was sent
        self.acked: dict[str, float] = {}  # status -> when its ack arrived
        self.updates = 0
        conn.on_control = self._control

    def _control(self, body: dict[str, Any], now: float) -> None:
        if body.get("type") == "ack" and body.get("doc") == self.doc_id:
            self.acked[self.status] = now

    async def sync(self) -> None:
        await self.conn.send(DocMessage(self.doc_id, encode_sync(SyncStep.STEP1, b"\x00")))
        self.doc.apply_update(await asyncio.wait_for(self.conn.step2, 30))

    async def move(self, status: str) -> None:
        before = self.doc.get_state()
        documents.work_order.set_status(self.doc, status, by=self.subject, role="technician")
        self.status = status
        self.acked.pop(status, None)
        self.sent[status] = time.perf_counter()
        self.updates += 1
        sync = encode_sync(SyncStep.UPDATE, self.doc.get_update(before))
        await self.conn.send(DocMessage(self.doc_id, sync))

    async def run(self, until: float, period: float) -> None:
        await asyncio.sleep(random.uniform(0, period))
        while time.perf_counter() < until:
            await self.move("on_hold" if self.status == "in_progress" else "in_progress")
            await asyncio.sleep(random.uniform(0.5 * period, 1.5 * period))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        "--devices",
        str(args.devices),
        "--teams",
        str(args.teams),
        "--dashboards",
        str(args.dashboards),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=1 << 24,  # one line carries every user's token
    )
    assert process.stdout is not None
    assert process.stdin is not None
    info = json.loads(await process.stdout.readline())
    url = f"ws://127.0.0.1:{info['port']}/v1/sync"
    tokens = info["tokens"]
    pid = info["pid"]
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        # Set-up: a work order per technician, created by its team's supervisor, then moved to
        # in_progress by the technician.
        supervisors = [
            await connect(http, url, tokens[f"s{n}"], f"console-{n}")
            for n in range(min(args.teams, args.dashboards))
        ]
        for n in range(args.devices):
            sup = supervisors[n % len(supervisors)]
            doc: Doc[Any] = Doc()
            fields = {"title": f"Pump {n}", "number": str(n), "assignee": f"t{n}"}
            fields |= {"team": f"team{n % args.teams}", "region": "east", "status": "assigned"}
            documents.work_order.write(
                doc, fields, [], "", by=f"s{n % args.teams}", role="supervisor"
            )
            acked = sup.expect("ack")
            await sup.send(DocMessage(f"wo:{n}", encode_sync(SyncStep.UPDATE, doc.get_update())))
            await asyncio.wait_for(acked, 30)
        devices = []
        for n in range(args.devices):
            device = Device(
                await connect(http, url, tokens[f"t{n}"], f"device-{n}"), f"wo:{n}", f"t{n}"
            )
            await device.sync()
            for status in ("en_route", "in_progress"):
                acked = device.conn.expect("ack")
                await device.move(status)
                await asyncio.wait_for(acked, 30)
            devices.append(device)
        by_doc = {device.doc_id: device for device in devices}

        async def phase(seconds: float) -> tuple[int, float]:
            updates = sum(d.updates for d in devices)
            cpu = cpu_seconds(pid)
            until = time.perf_counter() + seconds
            await asyncio.gather(*(d.run(until, args.period) for d in devices))
            await asyncio.sleep(1.0)  # the last acks and views
            return sum(d.updates for d in devices) - updates, cpu_seconds(pid) - cpu

        base_updates, base_cpu = await phase(args.seconds)

        latency_ack: list[float] = []
        latency_send: list[float] = []
        messages = 0

        def seen(body: dict[str, Any], now: float) -> None:
            nonlocal messages
            if body.get("type") != "view_changes":
                return
            messages += 1
            for row in body["changed"]:
                device = by_doc.get(row["id"])
                if device is None or row["status"] not in device.sent:
                    continue
                latency_send.append(now - device.sent[row["status"]])
                acked = device.acked.get(row["status"])
                if acked is not None:
                    latency_ack.append(max(0.0, now - acked))

        dashboards = []
        for n in range(args.dashboards):
            conn = await connect(http, url, tokens[f"s{n}"], f"dashboard-{n}")
            view = conn.expect("view")
            await conn.send(Control({"type": "subscribe", "view": "team-queue", "params": {}}))
            await asyncio.wait_for(view, 30)
            conn.on_control = seen
            dashboards.append(conn)
        views_updates, views_cpu = await phase(args.seconds)
        per_update_base = base_cpu / max(1, base_updates)
        per_update_views = views_cpu / max(1, views_updates)
        return {
            "bench": "dashboard_latency",
            "devices": args.devices,
            "dashboards": args.dashboards,
            "teams": args.teams,
            "seconds_per_phase": args.seconds,
            "updates_per_second": round(views_updates / args.seconds, 1),
            "view_changes_received": messages,
            "card_changes_timed": len(latency_send),
            "commit_to_view_ms": {
                "p50": _ms(percentile(latency_ack, 0.5)),
                "p99": _ms(percentile(latency_ack, 0.99)),
                "max": _ms(max(latency_ack, default=None)),
            },
            "send_to_view_ms": {
                "p50": _ms(percentile(latency_send, 0.5)),
                "p99": _ms(percentile(latency_send, 0.99)),
                "mean": _ms(statistics.fmean(latency_send) if latency_send else None),
            },
            "server_cpu_us_per_update": {
                "without_dashboards": round(per_update_base * 1e6),
                "with_dashboards": round(per_update_views * 1e6),
                "views_add": round((per_update_views - per_update_base) * 1e6),
            },
        }
    finally:
        await http.close()
        process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--dashboards", type=int, default=20)
    parser.add_argument("--teams", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument(
        "--period", type=float, default=2.0, help="seconds between a device's moves"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        asyncio.run(serve(arguments.devices, arguments.teams, arguments.dashboards))
    else:
        print(json.dumps(asyncio.run(main(arguments))))
