"""Simulated devices: technicians' phones and supervisors' tablets, each a `fieldsync.client.Client`
with its own offline SQLite file under the demo's `devices/` folder."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycrdt import Doc

from fieldsync import documents
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.client import Client
from fieldsync.demo import _dataset

_DEVICE_EXT = ".db"


@dataclass(eq=False)
class Device:
    """One user's device. `name` is also its file name under `devices/` and its device id."""

    name: str
    user: DevUser
    client: Client

    @property
    def is_supervisor(self) -> bool:
        return "supervisor" in self.user.roles

    def set_status(self, doc: Doc[Any], status: str, at: str) -> None:
        documents.work_order.set_status(
            doc, status, by=self.user.subject, role=self.user.roles[0], at=at
        )

    def work_orders(self) -> list[tuple[str, Doc[Any]]]:
        return [(d, doc) for d, doc in self.client.docs.items() if d.startswith("wo:")]


def open_device(name: str, user: DevUser, sync_url: str, issuer: DevIssuer, folder: Path) -> Device:
    async def token() -> str:
        # A fresh token on every (re)connect and renewal, as an app with a refresh token would.
        return issuer.issue(user.subject)

    client = Client(
        sync_url,
        token,
        path=folder / f"{name}{_DEVICE_EXT}",
        device_id=f"demo-{name}",
        platform="python",
        compress=True,
    )
    return Device(name, user, client)


def choose_users(count: int) -> list[tuple[str, DevUser]]:
    """(device name, user) for `count` devices: about one supervisor per five devices (at most
    one per team), then the technicians of the supervised teams, so that supervisors and
    technicians edit the same work orders. Beyond the 18 people, technicians get a second
    device (`<name>-2`)."""
    teams = list(_dataset.TEAMS)
    supervised = 0 if count < 2 else min(len(teams), max(1, count // 5))
    first, rest = teams[: max(1, supervised)], teams[max(1, supervised) :]
    # Taking turns between the teams' crews, the supervised teams first.
    pool = [
        user
        for group in (first, rest)
        for row in zip(*(_dataset.technicians(team) for team in group), strict=True)
        for user in row
    ]
    pool += [_dataset.supervisor(team) for team in teams[supervised:]]
    result = [(u.subject, u) for u in (_dataset.supervisor(t) for t in teams[:supervised])]
    for n in range(count - len(result)):
        user, copy = pool[n % len(pool)], n // len(pool)
        result.append((user.subject if copy == 0 else f"{user.subject}-{copy + 1}", user))
    return result


class Fleet:
    """The demo's devices, opened on first use; remembers closed ones for the traffic totals."""

    def __init__(self, sync_url: str, issuer: DevIssuer, folder: Path) -> None:
        self.sync_url = sync_url
        self.issuer = issuer
        self.folder = folder
        self.open: dict[str, Device] = {}
        self.closed: list[Device] = []

    def get(self, name: str, user: DevUser) -> Device:
        if name not in self.open:
            self.open[name] = open_device(name, user, self.sync_url, self.issuer, self.folder)
        return self.open[name]

    async def retire(self, keep: Collection[str] = ()) -> None:
        """Close every device not named in `keep`."""
        for name in [n for n in self.open if n not in keep]:
            device = self.open.pop(name)
            await device.client.close()
            self.closed.append(device)

    def everyone(self) -> list[Device]:
        return [*self.open.values(), *self.closed]


# --- waiting on devices ----------------------------------------------------------------------

TIMEOUT = 120.0  # generous: the default demo needs a few seconds per phase on 2 cores


class Stalled(Exception):
    """A phase did not finish in time; the demo says which devices and stops."""


async def caught_up(device: Device) -> None:
    async with asyncio.timeout(TIMEOUT):
        await device.client.caught_up.wait()


async def acked(device: Device) -> None:
    await device.client.wait_acked(timeout=TIMEOUT)


async def wait_all(
    devices: Iterable[Device], what: str, wait: Callable[[Device], Awaitable[None]]
) -> None:
    """`wait` for every device at once; raises `Stalled` naming the devices that timed out."""
    devices = list(devices)
    results = await asyncio.gather(*(wait(d) for d in devices), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
            raise result
    late = [d for d, r in zip(devices, results, strict=True) if isinstance(r, TimeoutError)]
    if late:
        names = ", ".join(f"{d.name} ({d.client.pending()} edits pending)" for d in late)
        raise Stalled(f"within {TIMEOUT:.0f}s, these devices did not {what}: {names}")


def describe(devices: Iterable[Device]) -> str:
    """'12 technicians, 3 supervisors'"""
    devices = list(devices)
    supervisors = sum(1 for d in devices if d.is_supervisor)
    return (
        f"{_count(len(devices) - supervisors, 'technician')}, {_count(supervisors, 'supervisor')}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
