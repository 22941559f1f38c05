"""Soak: the S1 fleet load for a long while, with churn, watching the server for leaks.

    python bench/soak.py --minutes 60                 # the real soak: S1 sizes, one hour
    python bench/soak.py --minutes 4 --docs 20 --clients 2 --interval 1   # a short look

A fieldsync server (`bench/serve.py`, its own process, fresh data folder on loopback) takes the
S1 load of bench/README.md: `--docs` work orders, `--clients` devices on each, every device
editing its work order at paced random intervals (mean `--interval` s; S1 is 100 x 4 at 0.2 s).
The devices are `fieldsync.client.Client`s over `fieldsync.v1`, with local stores. Every
`--churn-every` seconds one of them churns: it goes offline and keeps editing (offline edits,
sent when it comes back 2-10 s later), or reconnects as a new process would (same device, same
local store), or a supervisor reassigns a work order.

Every `--sample` seconds: the server's resident memory (/proc/PID/status VmRSS), its open file
descriptors (/proc/PID/fd), and the documents loaded and sockets open (`GET /v1/metrics`).
At the end the devices settle (all online until nothing is unacknowledged), and the report gives
the least-squares slope per minute of each series over the samples after the first fifth
(warm-up), the errors in the server's log, and whether every device's edits were acknowledged.
One JSON object on stdout; `--out` writes it to a file as well. Traffic stays on 127.0.0.1, and
everything stops after `--minutes` plus the settle time (at most `--settle` s).
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
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycrdt import Doc, Map

from fieldsync import documents
from fieldsync.client import Client

BENCH = Path(__file__).parent
TECHNICIANS = ("tina", "tom", "ulla", "uwe")


@dataclass
class Device:
    client: Client
    doc_id: str
    path: Path
    device_id: str
    edits: int = 0
    online: bool = True
    swapping: bool = False  # its client is being replaced: nobody touches it meanwhile


@dataclass
class Soak:
    args: argparse.Namespace
    url: str
    token: str
    pid: int
    devices: list[Device] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    sample_errors: list[str] = field(default_factory=list)
    churned: dict[str, int] = field(default_factory=lambda: {"offline": 0, "reconnect": 0})
    reassigned: int = 0
    stopping: bool = False
    _later: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def sync_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/v1/sync"

    def client(self, path: Path, device_id: str) -> Client:
        return Client(self.sync_url, self.token, path=path, device_id=device_id)

    async def start(self, work: Path) -> None:
        """Each work order created by its first device, the others joining it."""
        for d in range(self.args.docs):
            doc_id = f"wo:soak-{d}"
            for c in range(self.args.clients):
                device_id = f"soak-{d}-{c}"
                path = work / f"{device_id}.db"
                device = Device(self.client(path, device_id), doc_id, path, device_id)
                await device.client.start()
                if c == 0:
                    seed: Doc[Any] = Doc()
                    documents.work_order.write(
                        seed,
                        {"number": str(d), "title": f"Soak {d}", "assignee": "tina"}
                        | {"team": "north", "region": "east", "status": "assigned"},
                        by="admin-subject",
                        role="admin",
                    )
                    device.client.doc(doc_id).apply_update(seed.get_update())
                    await device.client.wait_acked(doc_id, timeout=60)
                else:
                    await device.client.wait_synced(doc_id, timeout=60)
                self.devices.append(device)

    async def edit(self, device: Device, rng: random.Random) -> None:
        """Paced edits of one field per device, online or not (offline ones queue locally)."""
        while not self.stopping:
            await asyncio.sleep(rng.expovariate(1 / self.args.interval))
            if self.stopping:
                return
            if device.swapping:
                continue
            device.client.doc(device.doc_id).get("fields", type=Map)[
                f"meter_{device.device_id}"
            ] = device.edits
            device.edits += 1

    async def churn(self, rng: random.Random) -> None:
        while not self.stopping:
            await asyncio.sleep(self.args.churn_every)
            action = rng.choice(("offline", "reconnect", "reassign"))
            candidates = [d for d in self.devices if d.online and not d.swapping]
            if action == "reassign" or not candidates:
                device = rng.choice([d for d in self.devices if not d.swapping])
                fields = device.client.doc(device.doc_id).get("fields", type=Map)
                fields["assignee"] = rng.choice(TECHNICIANS)
                self.reassigned += 1
                continue
            device = rng.choice(candidates)
            self.churned[action] += 1
            if action == "offline":
                device.online = False
                await device.client.go_offline()
                self._later.add(asyncio.create_task(self._back(device, rng.uniform(2, 10))))
            else:
                device.swapping = True
                await device.client.close()
                device.client = self.client(device.path, device.device_id)
                await device.client.start()
                device.swapping = False

    async def _back(self, device: Device, after: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(after)
        device.online = True
        if not self.stopping:
            await device.client.start()

    def sample(self, began: float, stop: threading.Event) -> None:
        """Every `--sample` seconds until `stop`, in a thread of its own: the devices' event loop
        runs flat out, and a sampler on it was starved (a 60-minute run once kept 4 samples)."""
        request = urllib.request.Request(
            self.url + "/v1/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        while not stop.wait(self.args.sample):
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    metrics = json.loads(answer.read())
                self.samples.append(
                    {
                        "minute": (time.monotonic() - began) / 60,
                        "rss_kib": _rss_kib(self.pid),
                        "fds": float(len(os.listdir(f"/proc/{self.pid}/fd"))),
                        "rooms_loaded": float(metrics["rooms_loaded"]),
                        "connections": float(metrics["connections"]),
                        "updates_stored": float(metrics["store"]["head"]),
                    }
                )
            except (OSError, KeyError, ValueError) as exc:  # counted; the next one is taken
                self.sample_errors.append(repr(exc))

    async def settle(self) -> int:
        """Every device online until nothing it holds is unacknowledged; returns how many edits
        stayed unacknowledged after `--settle` seconds (0: none lost in flight)."""
        for device in self.devices:
            await device.client.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.args.settle):
                for device in self.devices:
                    await device.client.wait_acked(timeout=self.args.settle)
        return sum(device.client.pending() for device in self.devices)


def _rss_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return 0.0


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points, None with fewer than 3."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def report(soak: Soak, log: list[str], pending: int, minutes: float) -> dict[str, Any]:
    warm = soak.samples[len(soak.samples) // 5 :]
    series = ("rss_kib", "fds", "rooms_loaded", "connections")
    slopes = {
        f"{name}_per_minute": slope([(s["minute"], s[name]) for s in warm]) for name in series
    }
    first, last = soak.samples[0], soak.samples[-1]
    stored = last["updates_stored"] - first["updates_stored"]
    return {
        "minutes": round(minutes, 2),
        "sizes": {
            "docs": soak.args.docs,
            "clients_per_doc": soak.args.clients,
            "interval_s": soak.args.interval,
        },
        "edits": sum(d.edits for d in soak.devices),
        # What the devices made; below docs x clients / interval, the load generator (one
        # Python process) could not keep up.
        "edits_per_s": round(sum(d.edits for d in soak.devices) / max(minutes * 60, 1), 1),
        "updates_stored_per_s": round(stored / max((last["minute"] - first["minute"]) * 60, 1), 1),
        "churn": {**soak.churned, "reassigned": soak.reassigned},
        "samples": len(soak.samples),
        "sample_errors": len(soak.sample_errors),
        "sample_errors_first": soak.sample_errors[:3],
        "slopes_after_warmup": {k: None if v is None else round(v, 3) for k, v in slopes.items()},
        # A leak climbs in every fifth; caches warming climb early and level off.
        "rss_kib_by_fifth": [
            round(statistics.fmean(s["rss_kib"] for s in fifth))
            for fifth in (
                soak.samples[i * len(soak.samples) // 5 : (i + 1) * len(soak.samples) // 5]
                for i in range(5)
            )
            if fifth
        ],
        "first": {k: first[k] for k in series},
        "last": {k: last[k] for k in series},
        "log_errors": sum(1 for line in log if " ERROR " in line or "Traceback" in line),
        "log_warnings": sum(1 for line in log if " WARNING " in line),
        "log_problems_first": [
            line.strip()[:300] for line in log if " ERROR " in line or " WARNING " in line
        ][:5],
        "unacknowledged_after_settle": pending,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fieldsync-soak-") as tmp:
        work = Path(tmp)
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "serve.py"),
            "--data-dir",
            str(work / "server"),
            "--log-level",
            "INFO",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert server.stdout is not None
        assert server.stderr is not None
        started = json.loads(await server.stdout.readline())
        log: list[str] = []

        async def keep(stream: asyncio.StreamReader) -> None:
            async for raw in stream:
                log.append(raw.decode(errors="replace"))

        readers = [asyncio.create_task(keep(s)) for s in (server.stdout, server.stderr)]
        soak = Soak(args, f"http://127.0.0.1:{started['port']}", started["token"], started["pid"])
        try:
            await soak.start(work)
            began = time.monotonic()
            stop = threading.Event()
            sampler = threading.Thread(target=soak.sample, args=(began, stop), daemon=True)
            sampler.start()
            tasks = [
                asyncio.create_task(soak.edit(d, random.Random(rng.random()))) for d in soak.devices
            ]
            tasks.append(asyncio.create_task(soak.churn(random.Random(rng.random()))))
            await asyncio.sleep(args.minutes * 60)
            soak.stopping = True
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(sampler.join)
            minutes = (time.monotonic() - began) / 60
            pending = await soak.settle()
            for device in soak.devices:
                await device.client.close()
        finally:
            if server.returncode is None:
                server.terminate()
            await server.wait()
            await asyncio.gather(*readers, return_exceptions=True)
        return report(soak, log, pending, minutes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--docs", type=int, default=100, help="work orders (S1: 100)")
    parser.add_argument("--clients", type=int, default=4, help="devices per work order (S1: 4)")
    parser.add_argument("--interval", type=float, default=0.2, help="mean s between edits")
    parser.add_argument("--churn-every", type=float, default=2.0, help="s between churn events")
    parser.add_argument("--sample", type=float, default=5.0, help="s between samples")
    parser.add_argument("--settle", type=float, default=60.0, help="s to wait for the last acks")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["log_errors"] == 0 and result["unacknowledged_after_settle"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
