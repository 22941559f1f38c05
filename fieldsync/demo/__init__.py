"""`fieldsync demo`: what a new user sees first.

In one process: a development OpenID issuer and the server on SQLite in a local folder; a
realistic dataset created through the server by the supervisors' devices; simulated technicians
and supervisors who go offline, edit the same work orders, and come back; then a check that every
replica converged on what the server stored, and a summary. With `stay` it keeps serving until
Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import orjson
from pycrdt import Doc

from fieldsync import documents
from fieldsync.app import configure_logging
from fieldsync.demo import _dataset, _devices, _report
from fieldsync.demo._devices import Device, Tally
from fieldsync.demo._server import Running, running
from fieldsync.replication import decode_state_vector
from fieldsync.storage import ScopeFilter, ScopeKind

__all__ = ["run_demo"]

# Generous ceilings: on a 2-core machine the default demo needs a few seconds per phase.
_ACK_TIMEOUT = 120.0
_CONVERGE_TIMEOUT = 60.0
_EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


async def run_demo(
    *,
    data_dir: Path,
    port: int = 8080,
    work_orders: int = 300,
    devices: int = 15,
    rounds: int = 3,
    stay: bool = True,
) -> int:
    """Run the demo; returns the exit code: 0 when every replica converged, 1 when not, 2 when
    the server could not start, 130 when interrupted before the summary."""
    if work_orders < 1 or devices < 1 or rounds < 0:
        print("fieldsync demo: need at least 1 work order and 1 device", file=sys.stderr)
        return 2
    outcome = _Outcome()
    with _interrupts() as interrupted:
        try:
            return await _run(data_dir, port, work_orders, devices, rounds, stay, outcome)
        except asyncio.CancelledError:
            if not interrupted():
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            print("fieldsync demo: stopped", flush=True)
            return _EXIT_INTERRUPTED if outcome.code is None else outcome.code


@dataclass
class _Outcome:
    code: int | None = None  # known once the summary is printed


async def _run(
    data_dir: Path,
    port: int,
    work_orders: int,
    devices: int,
    rounds: int,
    stay: bool,
    outcome: _Outcome,
) -> int:
    progress = _report.Progress()
    progress.out(
        f"fieldsync demo: {work_orders} work orders, {devices} devices, {rounds} rounds; "
        f"data in {data_dir}"
    )
    access = logging.getLogger("aiohttp.access")
    level = access.level
    access.setLevel(logging.WARNING)  # devices connect hundreds of times: keep the log quiet
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                server = await stack.enter_async_context(running(data_dir, port, _dataset.users()))
            except OSError as exc:
                print(
                    f"fieldsync demo: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"
                    " (choose another with --port)",
                    file=sys.stderr,
                )
                return 2
            progress.line(
                "issuer",
                f"{server.issuer.issuer} ({len(_dataset.users())} users, "
                f'password "{_dataset.PASSWORD}")',
                timed=False,
            )
            progress.line("server", f"{server.url} on SQLite {data_dir / 'fieldsync.db'}")
            fleet = _Fleet(server, data_dir / "devices")
            stack.push_async_callback(fleet.close)
            try:
                summary = await _simulate(server, fleet, progress, work_orders, devices, rounds)
            except _Stalled as exc:
                print(f"fieldsync demo: {exc}", file=sys.stderr)
                return 1
            await fleet.close()
            for line in summary.lines():
                progress.out(line)
            outcome.code = code = 0 if summary.converged else 1
            if not stay:
                return code
            await server.idle()  # the devices' connections are logged as they end
            access.setLevel(level)
            if not logging.getLogger().handlers:
                configure_logging("INFO")
            for line in _report.serving(
                server.url,
                server.issuer.issuer,
                str(data_dir),
                _dataset.doc_ids(0)[0],
                _dataset.who(),
            ):
                progress.out(line)
            await asyncio.get_running_loop().create_future()  # until Ctrl-C
            return code
    finally:
        access.setLevel(level)


class _Fleet:
    """The devices of the demo, opened on first use; keeps their traffic after they close."""

    def __init__(self, server: Running, folder: Path) -> None:
        self.server = server
        self.folder = folder
        self.devices: dict[str, Device] = {}
        self.closed: list[Device] = []

    def get(self, name: str, user: _dataset.DevUser) -> Device:
        if name not in self.devices:
            self.devices[name] = _devices.open_device(
                name, user, self.server.sync_url, self.server.issuer, self.folder
            )
        return self.devices[name]

    async def retire(self, keep: set[str]) -> None:
        for name in [n for n in self.devices if n not in keep]:
            device = self.devices.pop(name)
            await device.client.close()
            self.closed.append(device)

    async def close(self) -> None:
        await self.retire(set())

    def everyone(self) -> list[Device]:
        return [*self.devices.values(), *self.closed]


async def _simulate(
    server: Running,
    fleet: _Fleet,
    progress: _report.Progress,
    work_orders: int,
    devices: int,
    rounds: int,
) -> _report.Summary:
    dataset = _dataset.work_orders(work_orders, date.today())
    await _seed(server, fleet, progress, dataset)

    chosen = _devices.choose_users(devices)
    await fleet.retire({name for name, _ in chosen})
    sim = [fleet.get(name, user) for name, user in chosen]
    for device in sim:
        device.client.caught_up.clear()
        await device.client.start()
    await _all(sim, "catch up with the server", _caught_up)
    held = sum(len(d.client.docs) for d in sim)
    progress.line(
        "devices",
        f"{len(sim)} devices online ({_devices.describe(sim)}) hold {held} documents "
        "of their scope",
    )

    tally = Tally()
    rng = random.Random()
    for n in range(1, rounds + 1):
        await asyncio.gather(*(d.client.go_offline() for d in sim))
        stamp = f"{date.today().isoformat()} {7 + 2 * n:02d}:{rng.randint(0, 59):02d}"
        plan = _devices.plan_round(sim, rng)
        _devices.edit_offline(plan, rng, stamp, tally)
        edits, concurrent = tally.end_round()
        queued = sum(d.client.pending() for d in sim)
        back = time.perf_counter()
        for device in sim:
            await device.client.start()
        await _all(sim, "acknowledge the offline edits", _acked)
        touched = len({doc for _, docs in plan for doc in docs})
        progress.line(
            f"round {n}/{rounds}",
            f"offline: {edits} edits on {touched} work orders, {concurrent} of them on 2+ devices; "
            f"online: {queued} queued updates acknowledged in {time.perf_counter() - back:.1f}s",
        )

    lagging = await _await_convergence(server, sim)
    summary = await _check(server, fleet, sim, tally, progress, lagging)
    return summary


class _Stalled(Exception):
    """A phase did not finish in time; the demo says which devices and stops."""


async def _caught_up(device: Device) -> None:
    async with asyncio.timeout(_ACK_TIMEOUT):
        await device.client.caught_up.wait()


async def _acked(device: Device) -> None:
    await device.client.wait_acked(timeout=_ACK_TIMEOUT)


async def _all(devices: list[Device], what: str, wait: Callable[[Device], Awaitable[None]]) -> None:
    """`wait` for every device at once; raises `_Stalled` naming the devices that timed out."""
    results = await asyncio.gather(*(wait(d) for d in devices), return_exceptions=True)
    late = [d for d, r in zip(devices, results, strict=True) if isinstance(r, TimeoutError)]
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
            raise result
    if late:
        names = ", ".join(f"{d.name} ({d.client.pending()} edits pending)" for d in late)
        raise _Stalled(f"within {_ACK_TIMEOUT:.0f}s, these devices did not {what}: {names}")


async def _existing(server: Running) -> set[str]:
    """Every document the server has stored (the change feed with the admin's scope)."""
    ids: set[str] = set()
    since = 0
    while True:
        page = await server.store.changes(ScopeFilter(ScopeKind.ALL), since, 1000)
        ids.update(d.id for d in page.docs)
        since = page.upto
        if not page.more:
            return ids


async def _seed(
    server: Running,
    fleet: _Fleet,
    progress: _report.Progress,
    dataset: list[_dataset.SeedWorkOrder],
) -> None:
    """Each team's supervisor creates the team's work orders and their safety-check forms offline
    on their device, then syncs them. Documents the server holds already are not created again."""
    existing = await _existing(server)
    teams = [team for team in _dataset.TEAMS if any(wo.team == team for wo in dataset)]
    missing = [wo for wo in dataset if wo.doc_id not in existing or wo.form_id not in existing]
    if not missing:
        progress.line(
            "seed",
            f"the data folder holds the dataset already ({len(existing)} documents): "
            "not seeded again",
        )
        return

    async def create(device: Device, wos: list[_dataset.SeedWorkOrder]) -> None:
        client = device.client
        for wo in wos:
            # Skip what is stored, or was created on this device before and is still to sync.
            if wo.doc_id not in existing and wo.doc_id not in client.docs:
                documents.work_order.write(client.doc(wo.doc_id), wo.fields, wo.checklist, wo.notes)
            if wo.form_id not in existing and wo.form_id not in client.docs:
                documents.form.write(
                    client.doc(wo.form_id),
                    wo.doc_id,
                    _dataset.SAFETY_TEMPLATE,
                    _dataset.SAFETY_VERSION,
                    wo.form_answers,
                )
        await client.start()

    seeders = {team: fleet.get(s.subject, s) for team in teams for s in [_dataset.supervisor(team)]}
    for team, device in seeders.items():
        await create(device, [wo for wo in missing if wo.team == team])
    await _all(list(seeders.values()), "acknowledge the new documents", _acked)
    for device in seeders.values():
        await device.client.go_offline()
    new = await _existing(server) - existing
    wos = sum(1 for wo in dataset if wo.doc_id in new)
    forms = sum(1 for wo in dataset if wo.form_id in new)
    refused = sum(len(d.client.errors) for d in seeders.values())
    names = ", ".join(d.name for d in seeders.values())
    progress.line(
        "seed",
        f"{wos} work orders and {forms} safety-check forms created offline on the supervisors' "
        f"devices ({names}) and acknowledged by the server"
        + (f" ({len(existing)} documents were stored already)" if existing else "")
        + (f"; {refused} REFUSED" if refused else ""),
    )


async def _await_convergence(server: Running, devices: list[Device]) -> int:
    """Wait until every replica's state vector equals the server's (updates fan out after their
    commit); returns how many replicas still lag at the deadline."""
    replicator = server.replicator
    deadline = time.monotonic() + _CONVERGE_TIMEOUT
    while True:
        lagging = 0
        for device in devices:
            for doc_id, doc in list(device.client.docs.items()):
                room = await replicator.room(doc_id)
                theirs = decode_state_vector(room.state_vector())
                if decode_state_vector(doc.get_state()) != theirs:
                    lagging += 1
        if lagging == 0 or time.monotonic() > deadline:
            return lagging
        await asyncio.sleep(0.05)


def _stored_doc(snapshot: bytes | None, updates: list[bytes]) -> Doc:
    doc: Doc = Doc()
    for data in ([snapshot] if snapshot else []) + updates:
        doc.apply_update(data)
    return doc


async def _check(
    server: Running,
    fleet: _Fleet,
    sim: list[Device],
    tally: Tally,
    progress: _report.Progress,
    lagging: int,
) -> _report.Summary:
    """Compare every replica's content with the document rebuilt from the server's store."""
    stored: dict[str, dict[str, object]] = {}
    for doc_id in sorted({d for device in sim for d in device.client.docs}):
        loaded = await server.store.load(doc_id)
        doc = _stored_doc(loaded.snapshot, loaded.updates) if loaded else Doc()
        stored[doc_id] = documents.to_json(doc_id, doc)
    expected = {d: _canonical(content) for d, content in stored.items()}
    mismatches: list[str] = []
    bad: set[str] = set()
    replicas = 0
    for device in sim:
        for doc_id, doc in device.client.docs.items():
            replicas += 1
            if _canonical(documents.to_json(doc_id, doc)) != expected[doc_id]:
                bad.add(doc_id)
                mismatches.append(f"{doc_id} on {device.name}")
    kept = sum(1 for doc_id, line in tally.notes if line in str(stored[doc_id].get("notes", "")))
    progress.line(
        "converged" if not bad and not lagging else "DIVERGED",
        f"{len(stored) - len(bad)}/{len(stored)} documents identical on every device and in the "
        f"server's store ({replicas} replicas compared)",
    )
    everyone = fleet.everyone()
    return _report.Summary(
        docs_converged=len(stored) - len(bad),
        docs_checked=len(stored),
        replicas=replicas,
        devices=len(sim),
        mismatches=mismatches,
        stored=await server.store.stats(),
        received=sum(d.client.traffic.received for d in everyone),
        received_uncompressed=sum(d.client.traffic.received_uncompressed for d in everyone),
        sent=sum(d.client.traffic.sent for d in everyone),
        edits=tally.edits,
        concurrent_docs=tally.concurrent_docs,
        conflicts=tally.conflicts,
        text_merges=tally.text_merges,
        notes_kept=kept,
        notes_written=len(tally.notes),
        refused=sum(len(d.client.errors) for d in everyone),
        resets=sum(len(d.client.resets) for d in everyone),
        elapsed=progress.elapsed,
    )


def _canonical(content: dict[str, object]) -> bytes:
    # yrs does not keep the key order of JSON objects (DESIGN.md §9): compare with keys sorted.
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


@contextlib.contextmanager
def _interrupts() -> Iterator[_Counter]:
    """Ctrl-C (or SIGTERM) cancels the demo, which then shuts down in order: devices, server,
    issuer. A second Ctrl-C while it does so is only acknowledged."""
    counter = _Counter()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal() -> None:
        counter.count += 1
        if counter.count == 1 and task is not None:
            print("\nfieldsync demo: stopping…", flush=True)
            task.cancel()
        else:
            print("fieldsync demo: still stopping…", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or Windows: the default behaviour stays
    try:
        yield counter
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count
