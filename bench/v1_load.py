"""Load scenarios over fieldsync's own protocol, `fieldsync.v1` (DESIGN.md §3): BATCH, zstd, acks.

A lean device built on the `fieldsync.replication` codec (no local database, no reconnects), so
that what is timed is the server and the wire, not the client library's bookkeeping.

  s2  burst: one new work order, a writer and a receiver (both v1 sessions). The writer sends N
      small updates (made up front with pycrdt, one frame each, or `--batch K` updates per BATCH
      frame as a device back from offline would) as fast as it can. Measured: time until the
      writer holds the ack (sent only after the fsync) covering its last update, time until the
      receiver has all of them, server CPU per update.
  s3  cold sync of a fresh device, after the documents were preloaded (`ysync_load.py --scenario
      s3 --phase preload --state-file F` over `/v1/yws`) and the server restarted on the same
      data: hello -> welcome -> `changes` pages -> one BATCH (zstd) of a step 1 per listed
      document -> time until every step 2 is in; bytes received on the wire; every document's
      content is checked against what the preload wrote.

Prints one JSON line (and appends it to `--out`), like `ysync_load.py`, so both share one results
file. Loopback targets only; every wait is bounded by `--timeout`.

  python bench/v1_load.py --url ws://127.0.0.1:PORT/v1/sync --token T --scenario s2 --server-pid P
  python bench/v1_load.py --url ... --token T --scenario s3 --state-file F --server-pid P
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import aiohttp
import zstandard
from pycrdt import Doc, Map, Text

from fieldsync.replication import (
    Control,
    DocMessage,
    SyncStep,
    YSync,
    decode_frame,
    decode_state_vector,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
)

UNLIMITED = 1 << 30

# ---------------------------------------------------------------- measurement helpers


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process, in seconds (all its threads)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def proc_status(pid: int | None, key: str) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def lo_bytes() -> int | None:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[0])
    except OSError:
        return None
    return None


async def wait_until(predicate: Callable[[], bool], deadline: float, poll: float = 0.002) -> bool:
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(poll)
    return True


# ---------------------------------------------------------------- a lean v1 device


class Device:
    """One `/v1/sync` WebSocket: sends frames, and records what arrives (controls, y messages)."""

    def __init__(self, url: str, token: str, caps: list[str], name: str) -> None:
        self.url = url
        self.token = token
        self.caps = caps
        self.name = name
        self.compressor = zstandard.ZstdCompressor(level=3) if "zstd" in caps else None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.bytes_recv_uncompressed = 0
        self.frames_recv = 0
        self.frames_recv_zstd = 0
        self.welcome: dict[str, Any] | None = None
        self.changes: list[dict[str, Any]] = []
        self.caught_up = asyncio.Event()
        self.errors: list[dict[str, Any]] = []
        self.acks = 0
        self.ack_clock: dict[str, dict[int, int]] = {}  # doc -> client id -> durable clock
        self.docs: dict[str, Doc[Any]] = {}
        self.step2: set[str] = set()
        self.close_code: int | None = None
        self._reader: asyncio.Task[None] | None = None

    def doc(self, doc_id: str) -> Doc[Any]:
        doc = self.docs.get(doc_id)
        if doc is None:
            doc = self.docs[doc_id] = Doc()
        return doc

    async def connect(self, session: aiohttp.ClientSession) -> None:
        self.ws = await session.ws_connect(
            self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            max_msg_size=0,
            autoping=True,
            heartbeat=None,
        )
        self._reader = asyncio.create_task(self._read())

    async def send(self, messages: list[Control | DocMessage], compress_above: int = 256) -> None:
        assert self.ws is not None
        frame = encode_frame(
            [encode_body(m) for m in messages],
            compressor=self.compressor,
            compress_above=compress_above,
        )
        self.bytes_sent += len(frame)
        await self.ws.send_bytes(frame)

    async def hello(self) -> None:
        info = {"platform": "bench", "version": "1.0.0", "device_id": self.name}
        hello = {"type": "hello", "client": info, "since": 0, "caps": self.caps}
        await self.send([Control(hello)])

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for message in self.ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    data = message.data
                    self.bytes_recv += len(data)
                    self.frames_recv += 1
                    if data[0] & 1:
                        self.frames_recv_zstd += 1
                    items = decode_frame(data, max_frame=UNLIMITED, max_body=UNLIMITED)
                    for item in items:
                        if isinstance(item, Control):
                            self.bytes_recv_uncompressed += len(encode_body(item))
                            self._control(item.body)
                        else:
                            self.bytes_recv_uncompressed += len(item.doc) + len(item.message) + 2
                            self._doc(item)
                elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break
        except (asyncio.CancelledError, aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.close_code = self.ws.close_code

    def _control(self, body: dict[str, Any]) -> None:
        kind = body.get("type")
        if kind == "ack":
            self.acks += 1
            clocks = self.ack_clock.setdefault(body["doc"], {})
            for client, clock in (body.get("clock") or {}).items():
                if clock > clocks.get(int(client), 0):
                    clocks[int(client)] = clock
        elif kind == "welcome":
            self.welcome = body
        elif kind == "changes":
            self.changes.append(body)
            if not body.get("more"):
                self.caught_up.set()
        elif kind in ("error", "reset"):
            self.errors.append(body)

    def _doc(self, item: DocMessage) -> None:
        y = decode_y(item.message)
        if not isinstance(y, YSync):
            return
        if y.step is SyncStep.STEP1:
            return  # the server asks for our offline edits: a fresh device has none
        self.doc(item.doc).apply_update(y.payload)
        if y.step is SyncStep.STEP2:
            self.step2.add(item.doc)

    def state_vector(self, doc_id: str) -> dict[int, int]:
        doc = self.docs.get(doc_id)
        return decode_state_vector(doc.get_state()) if doc is not None else {}

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


def covers(have: dict[int, int], want: dict[int, int]) -> bool:
    return all(have.get(c, 0) >= k for c, k in want.items())


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=30),
    )


# ---------------------------------------------------------------- scenarios


async def scenario_s2(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """Burst: N updates to one new work order from one device; a second device receives them."""
    rng = random.Random(args.seed)
    doc_id = f"wo:{args.run_id}-v1s2"
    problems: list[str] = []
    deadline = time.perf_counter() + args.timeout
    async with new_session() as session:
        writer = Device(args.url, args.token, args.caps, f"{args.run_id}-writer")
        reader = Device(args.url, args.token, args.caps, f"{args.run_id}-reader")
        for device in (writer, reader):
            await device.connect(session)
            await device.hello()
            if not await wait_until(device.caught_up.is_set, deadline):
                return ["no `changes` after hello"]
            await device.send([DocMessage(doc_id, encode_sync(SyncStep.STEP1, b"\x00"))])

            def has_step2(d: Device = device) -> bool:
                return doc_id in d.step2

            if not await wait_until(has_step2, deadline):
                return ["no step 2 for the new document"]
        # The edits are made up front (one transaction each) so that only send -> server ->
        # ack / receiver is timed; the same mix as ysync_load.py's S2.
        ydoc = writer.doc(doc_id)
        updates: list[bytes] = []
        ydoc.observe(lambda event: updates.append(event.update))
        fields, notes = ydoc.get("fields", type=Map), ydoc.get("notes", type=Text)
        for i in range(1, args.n + 1):
            with ydoc.transaction():
                if rng.random() < 0.6:
                    fields[f"f{rng.randrange(20)}"] = f"v{i}"
                else:
                    notes += f" n{i}"
        cid = ydoc.client_id
        final = decode_state_vector(ydoc.get_state())[cid]
        bodies = [encode_body(DocMessage(doc_id, encode_sync(SyncStep.UPDATE, u))) for u in updates]
        frames = [
            encode_frame(
                bodies[i : i + args.batch],
                compressor=writer.compressor,
                compress_above=256,
            )
            for i in range(0, len(bodies), args.batch)
        ]
        recv0, lo0 = writer.bytes_recv + reader.bytes_recv, lo_bytes()
        t0 = time.perf_counter()
        assert writer.ws is not None
        for i, frame in enumerate(frames):
            writer.bytes_sent += len(frame)
            await writer.ws.send_bytes(frame)
            if i % 64 == 63:
                await asyncio.sleep(0)  # let the readers run (same process)
                if time.perf_counter() > deadline:
                    break
        res["send_s"] = time.perf_counter() - t0
        t_ack = t_recv = None
        while time.perf_counter() < deadline and (t_ack is None or t_recv is None):
            if t_ack is None and writer.ack_clock.get(doc_id, {}).get(cid, 0) >= final:
                t_ack = time.perf_counter() - t0
            if t_recv is None and reader.state_vector(doc_id).get(cid, 0) >= final:
                t_recv = time.perf_counter() - t0
            if writer.errors or reader.errors:
                break
            await asyncio.sleep(0.001)
        res["ack_s"] = t_ack
        res["wall_s"] = t_recv
        res["updates"] = args.n
        res["frames_sent"] = len(frames)
        res["acks"] = writer.acks
        if t_ack:
            res["acked_updates_per_s"] = args.n / t_ack
        if t_recv:
            res["updates_per_s"] = args.n / t_recv
        res["wire_payload_bytes"] = (
            writer.bytes_sent + writer.bytes_recv + reader.bytes_recv - recv0
        )
        lo1 = lo_bytes()
        res["loopback_bytes"] = lo1 - lo0 if lo0 is not None and lo1 is not None else None
        if t_ack is None:
            problems.append("the last update was never acknowledged")
        if t_recv is None:
            problems.append("the receiver never had every update")
        elif reader.doc(doc_id).get("fields", type=Map).to_py() != fields.to_py() or str(
            reader.doc(doc_id).get("notes", type=Text)
        ) != str(notes):
            problems.append("receiver content differs")
        problems += [f"server said {e}" for e in (writer.errors + reader.errors)[:5]]
        await writer.close()
        await reader.close()
    return problems


async def scenario_s3(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """Cold sync of a fresh device over one v1 session (after preload and restart)."""
    state = args.state
    names = [f"wo:{n}" for n in state["names"]]
    expected = {
        f"wo:{n}": {int(k): v for k, v in sv.items()} for n, sv in state["expected"].items()
    }
    content = {f"wo:{n}": tuple(c) for n, c in state["content"].items()}
    problems: list[str] = []
    deadline = time.perf_counter() + args.timeout
    async with new_session() as session:
        device = Device(args.url, args.token, args.caps, f"{args.run_id}-fresh")
        lo0 = lo_bytes()
        t0 = time.perf_counter()
        await device.connect(session)
        await device.hello()
        if not await wait_until(device.caught_up.is_set, deadline):
            return ["no last `changes` page"]
        t_changes = time.perf_counter() - t0
        listed = [d["id"] for page in device.changes for d in page["docs"]]
        missing = set(names) - set(listed)
        if missing:
            problems.append(f"{len(missing)} preloaded docs not in `changes`")
        messages: list[Control | DocMessage] = [
            DocMessage(doc_id, encode_sync(SyncStep.STEP1, b"\x00")) for doc_id in listed
        ]
        if "batch" in args.caps:
            await device.send(messages)
        else:
            for message in messages:
                await device.send([message])
        ok = await wait_until(lambda: len(device.step2) >= len(listed), deadline, 0.001)
        wall = time.perf_counter() - t0
        lo1 = lo_bytes()
        res["changes_s"] = t_changes
        res["wall_s"] = wall
        res["docs"] = len(listed)
        res["docs_per_s"] = len(listed) / wall
        res["bytes_received"] = device.bytes_recv
        res["bytes_received_uncompressed"] = device.bytes_recv_uncompressed
        res["bytes_sent"] = device.bytes_sent
        res["frames_received"] = device.frames_recv
        res["frames_received_zstd"] = device.frames_recv_zstd
        res["loopback_bytes"] = lo1 - lo0 if lo0 is not None and lo1 is not None else None
        if not ok:
            problems.append(f"only {len(device.step2)}/{len(listed)} step 2 received")
        for doc_id in names:
            if not covers(device.state_vector(doc_id), expected[doc_id]):
                problems.append(f"{doc_id}: missing updates")
                continue
            doc = device.doc(doc_id)
            got = (doc.get("fields", type=Map).to_py() or {}, str(doc.get("notes", type=Text)))
            if got != content[doc_id]:
                problems.append(f"{doc_id}: content differs")
        problems += [f"server said {e}" for e in device.errors[:5]]
        await device.close()
    return problems


SCENARIOS = {"s2": scenario_s2, "s3": scenario_s3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/v1/sync")
    p.add_argument("--token", required=True, help="access token (sent as a Bearer header)")
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--n", type=int, default=10_000, help="s2 updates")
    p.add_argument("--batch", type=int, default=1, help="s2 updates per frame (BATCH when > 1)")
    p.add_argument("--state-file", default=None, help="s3: ysync_load.py preload state")
    p.add_argument("--caps", default="zstd,batch", help="hello caps (s3 sends one BATCH if batch)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="fieldsync-v1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    host = urlparse(args.url).hostname or ""
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError
    except ValueError:
        print(f"refusing non-loopback target {host!r}", file=sys.stderr)
        return 2
    args.caps = [c for c in args.caps.split(",") if c]
    if args.scenario == "s3":
        with open(args.state_file) as fh:
            args.state = json.load(fh)
    args.run_id = uuid.uuid4().hex[:8]
    res: dict[str, Any] = {
        "label": args.label,
        "scenario": args.scenario,
        "protocol": "fieldsync.v1",
        "caps": args.caps,
        "sizes": {"n": args.n, "batch": args.batch} if args.scenario == "s2" else {},
    }
    with contextlib.suppress(ImportError):
        import uvloop  # the same client loop as ysync_load.py when it is installed

        uvloop.install()
    t0 = time.perf_counter()
    cpu0 = proc_cpu_s(args.server_pid)
    try:
        run = SCENARIOS[args.scenario](args, res)
        problems = asyncio.run(asyncio.wait_for(run, args.timeout + 30))
    except Exception as exc:
        problems = [f"scenario aborted: {exc!r}"]
    res["total_s"] = time.perf_counter() - t0
    cpu1 = proc_cpu_s(args.server_pid)
    res["server_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    if args.scenario == "s2" and res["server_cpu_s"] is not None:
        res["server_cpu_us_per_update"] = 1e6 * res["server_cpu_s"] / args.n
    res["server_peak_rss"] = proc_status(args.server_pid, "VmHWM")
    res["converged"] = not problems
    res["problems"] = problems[:20]
    line = json.dumps(res)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    if problems:
        print(f"FAILED: {args.label} {args.scenario}: " + "; ".join(problems[:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
