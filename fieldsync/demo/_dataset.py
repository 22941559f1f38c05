"""The demo's organisation and its seeded work: who the users are, and a realistic, repeatable
set of work orders with their checklists, notes and safety-check forms.

Work order `i` depends on `i` alone (its own random generator), so a run asked for more work
orders than the last one extends the same dataset instead of inventing a different one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from fieldsync.auth import DevUser

PASSWORD = "demo"  # DevUser's default; printed in the summary for `curl … /token`

# team -> region
TEAMS: dict[str, str] = {"north": "east", "south": "east", "west": "west"}

_TECHNICIANS: dict[str, tuple[tuple[str, str], ...]] = {
    "north": (
        ("aino", "Aino Virtanen"),
        ("bruno", "Bruno Costa"),
        ("chen", "Chen Wei"),
        ("dara", "Dara Okafor"),
        ("emil", "Emil Larsen"),
    ),
    "south": (
        ("farah", "Farah Haddad"),
        ("gus", "Gus Moreno"),
        ("hana", "Hana Sato"),
        ("ivan", "Ivan Petrov"),
        ("jo", "Jo Mbeki"),
    ),
    "west": (
        ("kai", "Kai Nakamura"),
        ("lena", "Lena Fischer"),
        ("milo", "Milo Novak"),
        ("nora", "Nora Lindqvist"),
        ("omar", "Omar Saleh"),
    ),
}
_SUPERVISORS: dict[str, tuple[str, str]] = {
    "north": ("sam", "Sam Supervisor"),
    "south": ("sue", "Sue Supervisor"),
    "west": ("wes", "Wes Supervisor"),
}
MANAGER = DevUser("mia", ("manager",), None, "east", "Mia Manager (region east)")
ADMIN = DevUser("ada", ("admin",), None, None, "Ada Admin")


def technicians(team: str) -> list[DevUser]:
    return [
        DevUser(subject, ("technician",), team, TEAMS[team], name)
        for subject, name in _TECHNICIANS[team]
    ]


def supervisor(team: str) -> DevUser:
    subject, name = _SUPERVISORS[team]
    return DevUser(subject, ("supervisor",), team, TEAMS[team], name)


def who() -> str:
    """The users, in one line, for people who want a token."""
    crews = "; ".join(
        f"{team}: {', '.join(s for s, _ in crew)} (supervisor {_SUPERVISORS[team][0]})"
        for team, crew in _TECHNICIANS.items()
    )
    return f"{crews}; manager {MANAGER.subject}; admin {ADMIN.subject}"


def users() -> dict[str, DevUser]:
    """Every demo user by subject: 15 technicians, 3 supervisors, a manager and an admin."""
    everyone = [u for team in TEAMS for u in technicians(team)]
    everyone += [supervisor(team) for team in TEAMS]
    everyone += [MANAGER, ADMIN]
    return {u.subject: u for u in everyone}


# --- work --------------------------------------------------------------------------------

_SITES: dict[str, tuple[str, ...]] = {
    "north": ("Harbor Pumping Station", "Millbrook Water Treatment", "Northgate Depot"),
    "south": ("Southfield Substation", "Oakridge Chiller Plant", "Bayview Hospital"),
    "west": ("Westport Container Terminal", "Cedar Hill Compressor Station", "Lakeside Brewery"),
}


@dataclass(frozen=True)
class _AssetKind:
    noun: str
    tag: str
    tasks: tuple[str, ...]  # "{asset}" is replaced by e.g. "pump P-104"
    checks: tuple[tuple[str, bool], ...]  # (label, required)
    symptoms: tuple[str, ...]


_KINDS = (
    _AssetKind(
        "pump",
        "P-",
        ("Replace seal on {asset}", "Inspect bearings on {asset}", "Realign coupling on {asset}"),
        (
            ("Isolate and drain the pump casing", True),
            ("Check shaft play and bearing noise", True),
            ("Verify no leak at 6 bar for 10 minutes", True),
            ("Record vibration reading", False),
        ),
        ("drips at the mechanical seal", "grinding noise at start-up", "vibration alarm at night"),
    ),
    _AssetKind(
        "valve",
        "V-",
        ("Repair leak at {asset}", "Replace actuator on {asset}", "Stroke-test {asset}"),
        (
            ("Confirm upstream and downstream isolation", True),
            ("Stroke valve fully open and closed", True),
            ("Check packing gland for weeping", False),
        ),
        ("weeps at the gland", "actuator slow to close", "does not seat fully"),
    ),
    _AssetKind(
        "air handler",
        "AHU-",
        ("Service filters on {asset}", "Replace belt on {asset}", "Clean coil on {asset}"),
        (
            ("Replace pre-filters and bag filters", True),
            ("Check belt tension and alignment", False),
            ("Clean condensate tray and drain", False),
            ("Record differential pressure after service", True),
        ),
        ("high filter differential pressure", "belt squeal", "water on the floor under the unit"),
    ),
    _AssetKind(
        "compressor",
        "C-",
        ("Oil change on {asset}", "Inspect intake on {asset}", "Replace drain trap on {asset}"),
        (
            ("Vent receiver to zero pressure", True),
            ("Drain and refill oil to the mark", True),
            ("Replace oil and air filters", False),
            ("Test safety valve", True),
            ("Log running hours", False),
        ),
        ("oil carry-over downstream", "high discharge temperature", "trips on overload"),
    ),
    _AssetKind(
        "chiller",
        "CH-",
        ("Inspect condenser on {asset}", "Leak-test {asset}", "Calibrate sensors on {asset}"),
        (
            ("Check refrigerant pressures against the log", True),
            ("Leak-test joints with detector", True),
            ("Clean condenser tubes", False),
            ("Verify supply water temperature setpoint", False),
        ),
        (
            "low suction pressure alarm",
            "supply water 3 K above setpoint",
            "compressor short-cycles",
        ),
    ),
    _AssetKind(
        "conveyor",
        "CV-",
        ("Replace idlers on {asset}", "Adjust belt tracking on {asset}", "Inspect {asset}"),
        (
            ("Lock out the drive and test for zero energy", True),
            ("Check belt tracking at head and tail pulleys", True),
            ("Inspect idlers and replace seized ones", False),
            ("Test emergency pull-cord along the run", True),
        ),
        (
            "belt runs off to the left",
            "seized idler near transfer point",
            "squeal at the tail pulley",
        ),
    ),
)

_PRIORITIES = (("low", 20), ("normal", 50), ("high", 22), ("urgent", 8))
_STATUSES = (("assigned", 80), ("in_progress", 12), ("on_hold", 8))

SAFETY_TEMPLATE = "safety-check"
SAFETY_VERSION = 3


@dataclass(frozen=True)
class SeedWorkOrder:
    """One work order of the dataset, and its safety-check form."""

    doc_id: str
    form_id: str
    team: str
    fields: dict[str, Any]
    checklist: list[Mapping[str, Any]]
    notes: str
    form_answers: dict[str, Any]

    @property
    def supervisor(self) -> str:
        return _SUPERVISORS[self.team][0]


def _weighted(rng: random.Random, choices: tuple[tuple[str, int], ...]) -> str:
    values = [value for value, _ in choices]
    return rng.choices(values, weights=[weight for _, weight in choices])[0]


def _number(i: int) -> str:
    return f"WO-{24001 + i}"


def doc_ids(i: int) -> tuple[str, str]:
    """The ids of work order `i` and of its safety-check form."""
    return f"wo:{_number(i)}", form_for(f"wo:{_number(i)}")


def form_for(wo_id: str) -> str:
    """The id of a work order's safety-check form (ids allow letters, digits, '-', '.', '_')."""
    return f"form:{wo_id.split(':', 1)[1]}-safety"


def work_order(i: int, today: date) -> SeedWorkOrder:
    """Work order number `i` (0-based) of the dataset, due relative to `today`."""
    rng = random.Random(f"fieldsync-demo:{i}")
    teams = list(TEAMS)
    team = teams[i % len(teams)]
    crew = _TECHNICIANS[team]
    assignee = crew[(i // len(teams)) % len(crew)][0]
    kind = rng.choice(_KINDS)
    asset_id = f"{kind.tag}{rng.randint(100, 399)}"
    title = rng.choice(kind.tasks).format(asset=f"{kind.noun} {asset_id}")
    number = _number(i)
    site = rng.choice(_SITES[team])
    # 3-6 items: lockout first, then some of the asset's own checks, often a hand-back.
    items = [("Lockout/tagout applied and verified", True)]
    items += kind.checks[: rng.randint(2, len(kind.checks))]
    if len(items) < 6 and rng.random() < 0.6:
        items.append(("Area cleaned and handed back to operator", False))
    checklist: list[Mapping[str, Any]] = [
        {"id": f"c{n}", "label": label, "required": required, "done": False}
        for n, (label, required) in enumerate(items, start=1)
    ]
    symptom = rng.choice(kind.symptoms)
    notes = f"Operator reports {symptom}.\n" if rng.random() < 0.8 else ""
    fields = {
        "number": number,
        "title": title,
        "description": f"{title} at {site}. Reported: {symptom}.",
        "status": _weighted(rng, _STATUSES),
        "priority": _weighted(rng, _PRIORITIES),
        "assignee": assignee,
        "team": team,
        "region": TEAMS[team],
        "asset_id": asset_id,
        "site": site,
        "due_at": (today + timedelta(days=rng.randint(-3, 21))).isoformat(),
        "erp_ref": f"PM-{4500000 + i * 7 + rng.randint(0, 6)}",
    }
    answers = {
        "permit_number": f"PTW-{today.year}-{i + 1:05d}",
        "hazards": rng.choice(
            (
                "rotating equipment",
                "stored pressure",
                "electrical, 400 V",
                "confined space",
                "hot surfaces",
            )
        ),
    }
    doc_id, form_id = doc_ids(i)
    return SeedWorkOrder(
        doc_id=doc_id,
        form_id=form_id,
        team=team,
        fields=fields,
        checklist=checklist,
        notes=notes,
        form_answers=answers,
    )


def work_orders(count: int, today: date) -> list[SeedWorkOrder]:
    return [work_order(i, today) for i in range(count)]
