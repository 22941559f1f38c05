"""A test outbound adapter: a target that honours the `OutboundAdapter` contract (it keeps the
last seq applied per document, so a delivery it has already applied changes nothing) and
records every delivery it is handed. Failures are scripted per document."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from fieldsync.adapters import (
    AdapterContext,
    Delivery,
    DeliveryError,
    Health,
    HealthState,
    Table,
    register_kind,
)

KIND = "recorder"


class Recorder:
    kind = KIND

    def __init__(
        self, name: str, *, doc_types: frozenset[str] = frozenset({"wo"}), max_attempts: int = 3
    ) -> None:
        self.name = name
        self.doc_types = doc_types
        self.max_attempts = max_attempts
        self.deliveries: list[Delivery] = []  # every delivery handed over, failed ones too
        self.applied: dict[str, tuple[int, Mapping[str, Any]]] = {}  # doc -> (seq, document)
        self.script: dict[str, list[DeliveryError]] = {}  # doc -> the next failures, in order
        self.poison: dict[str, DeliveryError] = {}  # doc -> fails every time
        self.running = False
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def health(self) -> Health:
        if not self.running:
            return Health(HealthState.DOWN, "stopped")
        if self.poison:
            return Health(HealthState.DEGRADED, f"{len(self.poison)} documents refused")
        return Health(HealthState.OK)

    def metrics(self) -> Mapping[str, float]:
        return {"deliveries": len(self.deliveries), "applied": len(self.applied)}

    async def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.changed.set()
        if delivery.doc in self.poison:
            raise self.poison[delivery.doc]
        if self.script.get(delivery.doc):
            raise self.script[delivery.doc].pop(0)
        last = self.applied.get(delivery.doc)
        if last is None or delivery.seq > last[0]:
            self.applied[delivery.doc] = (delivery.seq, delivery.document)

    def seqs(self, doc: str) -> list[int]:
        return [d.seq for d in self.deliveries if d.doc == doc]


def build(name: str, table: Table, context: AdapterContext) -> Recorder:
    return Recorder(
        name,
        doc_types=frozenset(table.texts("doc_types", ("wo",))),
        max_attempts=table.max_attempts(),
    )


register_kind(KIND, build)
