"""`fieldsync demo`: what a new user sees first.

In one process: a development OpenID issuer and the server on SQLite in a local folder; a
realistic dataset created through the server by the supervisors' devices; simulated technicians
and supervisors who go offline, edit the same work orders, and come back; then a check that every
replica converged on what the server stored; when an MQTT broker is reachable, the plant floor
(an alarm becomes a work order, a machine counter a meter reading in it); when a directory is
named, the team and region it gives the users; and a summary. With
`stay` it keeps serving until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from fieldsync.app import configure_logging
from fieldsync.auth import DevUser
from fieldsync.demo import (
    _converge,
    _dataset,
    _devices,
    _directory,
    _edits,
    _erp,
    _plant,
    _report,
    _seed,
)
from fieldsync.demo._cluster import LocalCluster, run_cluster
from fieldsync.demo._devices import Device, Fleet, Stalled
from fieldsync.demo._directory import LdapOption
from fieldsync.demo._server import QuietLog, Running, quiet_access_log, running
from fieldsync.demo._signals import interrupts

__all__ = ["LdapOption", "LocalCluster", "run_cluster", "run_demo"]

EXIT_CONVERGED, EXIT_DIVERGED, EXIT_NOT_STARTED = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


async def run_demo(
    *,
    data_dir: Path,
    port: int = 8080,
    work_orders: int = 300,
    devices: int = 15,
    rounds: int = 3,
    stay: bool = True,
    mqtt: str | None = _plant.DEFAULT_BROKER,
    ldap: LdapOption | None = None,
) -> int:
    """Run the demo and return the exit code: 0 when every replica converged, 1 when not, 2 when
    it could not start, 130 when interrupted before the summary (after it: the summary's code).
    `mqtt` is the broker's host:port for the plant floor (None: no plant floor); `ldap` the
    directory the server reads team and region from (None: none; its bind password is in the
    environment variable `_directory.PASSWORD_ENV`)."""
    if work_orders < 1 or devices < 1 or rounds < 0:
        print("fieldsync demo: needs 1+ work orders, 1+ devices, 0+ rounds", file=sys.stderr)
        return EXIT_NOT_STARTED
    if mqtt is not None:
        try:
            _plant.parse_broker(mqtt)
        except ValueError as exc:
            print(f"fieldsync demo: {exc}", file=sys.stderr)
            return EXIT_NOT_STARTED
    wrong = ldap.check() if ldap is not None else None
    if wrong is not None:
        print(f"fieldsync demo: {wrong}", file=sys.stderr)
        return EXIT_NOT_STARTED
    outcome = _Outcome()
    with interrupts() as interrupted:
        try:
            return await _run(
                data_dir, port, work_orders, devices, rounds, stay, mqtt, ldap, outcome
            )
        except asyncio.CancelledError:
            if not interrupted.count:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: this task goes on to return normally
            print("fieldsync demo: stopped", flush=True)
            return EXIT_INTERRUPTED if outcome.code is None else outcome.code


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
    mqtt: str | None,
    ldap: LdapOption | None,
    outcome: _Outcome,
) -> int:
    progress = _report.Progress()
    progress.out(
        f"fieldsync demo: {work_orders} work orders, {devices} devices, {rounds} rounds; "
        f"data in {data_dir}"
    )
    directory = await _directory.probe(ldap)
    users = directory.users(_dataset.users())
    async with contextlib.AsyncExitStack() as stack:
        access_log = stack.enter_context(quiet_access_log())
        floor = await stack.enter_async_context(_plant.floor(mqtt, date.today()))
        try:
            server = await stack.enter_async_context(
                running(data_dir, port, users, floor.adapters() + directory.section())
            )
        except OSError as exc:
            print(
                f"fieldsync demo: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"
                " (choose another with --port)",
                file=sys.stderr,
            )
            return EXIT_NOT_STARTED
        progress.line(
            "issuer",
            f'{server.issuer.issuer} ({len(users)} users, password "{_dataset.PASSWORD}")',
            timed=False,
        )
        progress.line("server", f"{server.url} on SQLite {data_dir / 'fieldsync.db'}")
        await _plant.register_assets(floor, server)
        fleet = Fleet(server.sync_url, server.issuer, data_dir / "devices")
        stack.push_async_callback(fleet.retire)
        try:
            summary = await _simulate(
                server, fleet, floor, directory, users, progress, work_orders, devices, rounds
            )
        except Stalled as exc:
            print(f"fieldsync demo: {exc}", file=sys.stderr)
            return EXIT_DIVERGED
        await fleet.retire()
        for line in summary.lines():
            progress.out(line)
        outcome.code = EXIT_CONVERGED if summary.converged else EXIT_DIVERGED
        if stay:
            await _serve(server, progress, data_dir, access_log)
        return outcome.code


async def _simulate(
    server: Running,
    fleet: Fleet,
    floor: _plant.Floor,
    directory: _directory.Directory,
    users: Mapping[str, DevUser],
    progress: _report.Progress,
    work_orders: int,
    devices: int,
    rounds: int,
) -> _report.Summary:
    await _seed.seed(server, fleet, progress, _dataset.work_orders(work_orders, date.today()))

    chosen = _devices.choose_users(devices)
    await fleet.retire(keep={name for name, _ in chosen})
    sim = [fleet.get(name, user) for name, user in chosen]
    for device in sim:
        await device.client.start()
    await _devices.wait_all(sim, "catch up with the server", _devices.caught_up)
    progress.line(
        "devices",
        f"{len(sim)} devices online ({_devices.describe(sim)}) hold "
        f"{sum(len(d.client.docs) for d in sim)} documents of their scope",
    )

    tally = _edits.Tally()
    rng = random.Random()
    for n in range(1, rounds + 1):
        await _offline_round(sim, rng, tally, progress, f"round {n}/{rounds}", 7 + 2 * n)

    behind = await _converge.settle(server, sim)
    verdict = await _converge.compare(server.store, sim)
    if behind:
        verdict.mismatches.append(
            f"{behind} replicas still behind the server after {_converge.TIMEOUT:.0f}s"
        )
    ok = verdict.identical == verdict.docs and not verdict.mismatches
    progress.line(
        "converged" if ok else "DIVERGED",
        f"{verdict.identical}/{verdict.docs} documents identical on every device and in the "
        f"server's store ({verdict.replicas} replicas compared)",
    )
    plant_floor = await _plant.show(floor, server)
    progress.line("plant floor", plant_floor)
    read = await _directory.show(directory, server, users)
    progress.line("directory", read)
    erp = await _erp.landed(server.backend, server.data_dir)
    everyone = fleet.everyone()
    return _report.Summary(
        docs_converged=verdict.identical,
        docs_checked=verdict.docs,
        replicas=verdict.replicas,
        devices=len(sim),
        mismatches=verdict.mismatches,
        stored=await server.store.stats(),
        received=sum(d.client.traffic.received for d in everyone),
        received_uncompressed=sum(d.client.traffic.received_uncompressed for d in everyone),
        sent=sum(d.client.traffic.sent for d in everyone),
        edits=tally.edits,
        concurrent_docs=tally.concurrent_docs,
        conflicts=tally.conflicts,
        text_merges=tally.text_merges,
        notes_kept=sum(1 for doc, line in tally.notes if line in verdict.notes.get(doc, "")),
        notes_written=len(tally.notes),
        refused=sum(
            1 for d in everyone for e in d.client.errors if e.get("code") != "rule_violation"
        ),
        corrections=Counter(
            e.get("rule", "?")
            for d in everyone
            for e in d.client.errors
            if e.get("code") == "rule_violation"
        ),
        resets=sum(len(d.client.resets) for d in everyone),
        elapsed=progress.elapsed,
        erp=erp.lines(),
        plant_floor=plant_floor,
        directory=read,
    )


async def _offline_round(
    sim: list[Device],
    rng: random.Random,
    tally: _edits.Tally,
    progress: _report.Progress,
    name: str,
    hour: int,
) -> None:
    """Every device goes offline, its user edits, and all come back online at once."""
    await asyncio.gather(*(d.client.go_offline() for d in sim))
    stamp = f"{date.today().isoformat()} {hour:02d}:{rng.randint(0, 59):02d}"
    plan = _edits.plan_round(sim, rng)
    _edits.edit_offline(plan, rng, stamp, tally)
    edits, concurrent = tally.end_round()
    queued = sum(d.client.pending() for d in sim)
    back = time.perf_counter()
    for device in sim:
        await device.client.start()
    await _devices.wait_all(sim, "acknowledge the offline edits", _devices.acked)
    progress.line(
        name,
        f"offline: {edits} edits on {len({d for _, docs in plan for d in docs})} work orders, "
        f"{concurrent} of them on 2+ devices; online: {queued} queued updates acknowledged in "
        f"{time.perf_counter() - back:.1f}s",
    )


async def _serve(
    server: Running, progress: _report.Progress, data_dir: Path, access_log: QuietLog
) -> None:
    """Keep serving until Ctrl-C, with the access log back on."""
    await server.idle()  # the devices' connections are logged as they end
    access_log.restore()
    if not logging.getLogger().handlers:
        configure_logging("INFO")
    for line in _report.serving(
        server.url, server.issuer.issuer, str(data_dir), _dataset.doc_ids(0)[0], _dataset.who()
    ):
        progress.out(line)
    await asyncio.get_running_loop().create_future()  # resolved by nobody: cancelled by Ctrl-C
