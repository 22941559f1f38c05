"""What the simulated users do while their devices are offline, and a tally of it: which
documents and fields were edited on several devices at once, for the server to merge."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pycrdt import Array, Doc, Map, Text

from fieldsync.demo import _dataset
from fieldsync.demo._devices import Device


@dataclass
class Tally:
    """Edits made offline, counted per round to show what the server had to merge."""

    edits: int = 0
    concurrent_docs: int = 0  # (round, document) pairs edited on 2+ devices while offline
    conflicts: int = 0  # (round, document, field) written on 2+ devices: one value must win
    text_merges: int = 0  # (round, document) whose notes 2+ devices appended to
    notes: list[tuple[str, str]] = field(default_factory=list)  # (doc, line) appended
    _round_edits: int = 0
    _writers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _fields: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    _noted: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def wrote(self, device: Device, doc_id: str, path: str) -> None:
        self._round_edits += 1
        self._writers[doc_id].add(device.name)
        self._fields[doc_id, path].add(device.name)

    def noted(self, device: Device, doc_id: str, line: str) -> None:
        self._round_edits += 1
        self._writers[doc_id].add(device.name)
        self._noted[doc_id].add(device.name)
        self.notes.append((doc_id, line))

    def end_round(self) -> tuple[int, int]:
        """Close the round; returns (edits in it, documents edited on 2+ devices in it)."""
        edits, self._round_edits = self._round_edits, 0
        concurrent = sum(1 for names in self._writers.values() if len(names) > 1)
        self.edits += edits
        self.concurrent_docs += concurrent
        self.conflicts += sum(1 for names in self._fields.values() if len(names) > 1)
        self.text_merges += sum(1 for names in self._noted.values() if len(names) > 1)
        self._writers.clear()
        self._fields.clear()
        self._noted.clear()
        return edits, concurrent


# --- the edits --------------------------------------------------------------------------------

_TECH_NOTES = (
    "Seal replaced, no leak at 6 bar after 10 minutes.",
    "Waiting on a spare bearing from stores.",
    "Corrosion on the base plate, photo attached.",
    "Shift lead on site, access through gate 3.",
    "Isolation checked with the control room.",
    "Found the drain line blocked, cleared it.",
    "Readings normal after restart.",
)
_SUPERVISOR_NOTES = (
    "Customer asks to finish before the weekend shutdown.",
    "Spare parts reserved in stores, bin 14-C.",
    "Raised priority: the line stops if this fails.",
    "Please call the control room before isolating.",
    "Second technician available after 14:00 if needed.",
)
_PRIORITIES = ("low", "normal", "high", "urgent")


def _append_note(
    device: Device, doc_id: str, doc: Doc[Any], text: str, stamp: str, tally: Tally
) -> None:
    line = f"{stamp} {device.user.name} ({device.name}): {text}\n"
    notes = doc.get("notes", type=Text)
    with doc.transaction():
        notes += line
    tally.noted(device, doc_id, line)


def technician_visit(
    device: Device, doc_id: str, rng: random.Random, stamp: str, tally: Tally
) -> None:
    """A technician works on one of their work orders offline: moves its status on, ticks
    checklist items, fills the safety check, logs its time and the parts it used, writes a note,
    and completes it when allowed (the ERP then confirms the time and issues the parts)."""
    doc = device.client.docs[doc_id]
    fields = doc.get("fields", type=Map)
    checklist = doc.get("checklist", type=Array)
    status = fields.get("status")
    # Driving there, then starting work: each a separate action on the device.
    for before, after in (("assigned", "en_route"), ("en_route", "in_progress")):
        if status == before or (after == "in_progress" and status == "on_hold"):
            device.set_status(doc, after, stamp)
            tally.wrote(device, doc_id, "fields.status")
            status = after
    if status == "in_progress":
        items = checklist.to_py() or []
        open_items = [n for n, item in enumerate(items) if not item.get("done")]
        for n in rng.sample(open_items, min(len(open_items), rng.randint(1, 3))):
            item = checklist[n]
            with doc.transaction():
                item.update({"done": True, "done_by": device.user.subject, "done_at": stamp})
            tally.wrote(device, doc_id, f"checklist.{items[n].get('id')}")
        form_id = _dataset.form_for(doc_id)
        form = device.client.docs.get(form_id)
        if form is not None:
            answers = form.get("answers", type=Map)
            if "lockout_tagout" not in answers:
                with form.transaction():
                    answers.update(
                        {
                            "lockout_tagout": True,
                            "ppe_checked": True,
                            "gas_test_ppm": round(rng.uniform(0, 4), 1),
                            "signed_by": device.user.subject,
                        }
                    )
                tally.wrote(device, form_id, "answers")
        _log_work(device, doc, rng, stamp)
    _append_note(device, doc_id, doc, rng.choice(_TECH_NOTES), stamp, tally)
    required_done = all(
        item.get("done") for item in checklist.to_py() or [] if item.get("required")
    )
    if status == "in_progress" and required_done:
        device.set_status(doc, "completed", stamp)
        tally.wrote(device, doc_id, "fields.status")


_PARTS = ("SEAL-40", "FLT-220", "BRG-6204", "VLV-DN50", "GSK-12")


def _log_work(device: Device, doc: Doc[Any], rng: random.Random, stamp: str) -> None:
    """A time entry in the technician's own name (at most an hour from `stamp`: a later round
    starts two hours on, so one technician's entries never overlap) and, now and then, a part."""
    start = datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()
    entry = {"by": device.user.subject, "start": start, "end": start + 60 * rng.randint(15, 60)}
    with doc.transaction():
        doc.get("time_entries", type=Array).append(Map(entry))
        if rng.random() < 0.5:
            part = {"part_id": rng.choice(_PARTS), "quantity": rng.randint(1, 3)}
            doc.get("parts", type=Array).append(Map(part))


def supervisor_review(
    device: Device, doc_id: str, rng: random.Random, stamp: str, tally: Tally
) -> None:
    """A supervisor reviews a work order of the team offline: re-prioritises it, moves its due
    date, leaves a note, and now and then puts it on hold or cancels it."""
    doc = device.client.docs[doc_id]
    fields = doc.get("fields", type=Map)
    current = fields.get("priority")
    with doc.transaction():
        fields["priority"] = rng.choice([p for p in _PRIORITIES if p != current])
    tally.wrote(device, doc_id, "fields.priority")
    due = str(fields.get("due_at") or "")
    if rng.random() < 0.5 and len(due) == 10:
        day = int(due[8:]) % 28 + 1  # a plausible other day of the same month
        with doc.transaction():
            fields["due_at"] = f"{due[:8]}{day:02d}"
        tally.wrote(device, doc_id, "fields.due_at")
    if rng.random() < 0.6:
        _append_note(device, doc_id, doc, rng.choice(_SUPERVISOR_NOTES), stamp, tally)
    roll = rng.random()
    if roll < 0.08 and fields.get("status") not in ("closed", "cancelled"):
        # The customer called it off: a cancel dominates whatever the technician does offline
        # meanwhile (the server's rules keep it cancelled, and the work done).
        device.set_status(doc, "cancelled", stamp)
        tally.wrote(device, doc_id, "fields.status")
    elif roll < 0.28 and fields.get("status") == "in_progress":
        device.set_status(doc, "on_hold", stamp)
        tally.wrote(device, doc_id, "fields.status")


def _open(doc: Doc[Any]) -> bool:
    return bool(doc.get("fields", type=Map).get("status") != "completed")


def plan_round(
    devices: Iterable[Device], rng: random.Random, per_technician: int = 3
) -> list[tuple[Device, list[str]]]:
    """Which work orders each device touches this round. Supervisors review about half of what
    their technicians work on, plus a few others: the same documents, edited concurrently."""
    devices = list(devices)
    plan: list[tuple[Device, list[str]]] = []
    worked: set[str] = set()
    for device in devices:
        if device.is_supervisor:
            continue
        mine = sorted(
            d
            for d, doc in device.work_orders()
            if _open(doc) and doc.get("fields", type=Map).get("assignee") == device.user.subject
        )
        picked = rng.sample(mine, min(per_technician, len(mine)))
        worked.update(picked)
        plan.append((device, picked))
    for device in devices:
        if not device.is_supervisor:
            continue
        team = sorted(d for d, doc in device.work_orders() if _open(doc))
        shared = sorted(d for d in team if d in worked)
        picked = rng.sample(shared, math.ceil(len(shared) / 2))
        others = [d for d in team if d not in picked]
        picked += rng.sample(others, min(2, len(others)))
        plan.append((device, picked))
    return plan


def edit_offline(
    plan: list[tuple[Device, list[str]]], rng: random.Random, stamp: str, tally: Tally
) -> None:
    for device, doc_ids in plan:
        for doc_id in doc_ids:
            if device.is_supervisor:
                supervisor_review(device, doc_id, rng, stamp, tally)
            else:
                technician_visit(device, doc_id, rng, stamp, tally)
