"""The seams every adapter shares (DESIGN.md §7): its lifecycle and health, what an outbound
adapter is handed by the outbox, and the face of the write path an inbound adapter writes
through. Each kind lives in its own module and builds on these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pycrdt import Doc

from fieldsync.records import Origin
from fieldsync.storage import ImportResult


class HealthState(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # working from a last good copy, or retrying
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Health:
    state: HealthState
    detail: str = ""


class Adapter(Protocol):
    """One configured adapter instance (`[adapters.<name>]` of the adapters file)."""

    name: str
    kind: str

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop cleanly: finish or abandon (to be retried) what is in hand, never half-write."""
        ...

    def health(self) -> Health: ...

    def metrics(self) -> Mapping[str, float]:
        """Counters and gauges an operator reads (messages in, effects, errors, lag)."""
        ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """One effect the outbox asks an outbound adapter to make: `document` is the JSON projection
    (`fieldsync.documents.to_json`) of `doc` as of change `seq`. Pending changes of one document
    may have been coalesced into this, its latest state. `key` is the idempotency key of the
    effect: the same (adapter, doc, seq) always gives the same key."""

    adapter: str
    doc: str
    seq: int
    document: Mapping[str, Any]
    attempt: int  # 1 on the first try

    @property
    def key(self) -> str:
        return f"{self.adapter}:{self.doc}:{self.seq}"


class DeliveryError(Exception):
    """A delivery that did not take effect. `retryable` false (a business refusal) dead-letters
    the entry at once; otherwise the outbox retries with backoff, not before `retry_after`
    seconds when the target said so. `code` is stable text an operator can act on; `entity` is
    the target's record the error is about, when known."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        entity: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.entity = entity


@runtime_checkable  # the outbox tells outbound adapters from the others by their shape
class OutboundAdapter(Adapter, Protocol):
    """An adapter the outbox feeds: every committed change of a document of `doc_types` that did
    not come from this adapter itself."""

    doc_types: frozenset[str]  # "wo", "form"
    max_attempts: int

    async def deliver(self, delivery: Delivery) -> None:
        """Make the effect, exactly once for its `key` (the target keeps the last seq applied
        per document); raises `DeliveryError`."""
        ...


@runtime_checkable  # the server finds the directory adapter among the others by its shape
class DirectoryAdapter(Adapter, Protocol):
    """An adapter that keeps the directory table (`AdapterContext.directory`), from which the
    server enriches and deprovisions principals."""

    # Where a principal's team and region come from: "token", "directory" or
    # "token_then_directory" (`fieldsync.auth.TeamSource`).
    team_source: str


class DocumentWriter(Protocol):
    """What an inbound adapter may do to documents: the device write path (authorise, apply,
    rules, commit, fan-out) as a service principal, its changes tagged with its origin."""

    async def edit(
        self, doc_id: str, change: Callable[[Doc[Any]], None], origin: Origin
    ) -> int | None:
        """Apply `change` to the document as it is now (an empty one when it does not exist
        yet) and commit it; return the change seq, None when it changed nothing. Raises what
        the write path raises (forbidden, rule violations are corrected as for a device)."""
        ...

    async def read(self, doc_id: str) -> Mapping[str, Any] | None:
        """The document's JSON projection, None when it does not exist."""
        ...


@runtime_checkable
class ReferenceImporter(Adapter, Protocol):
    """An adapter that feeds a reference dataset, whose import an operator may also run at once
    (`fieldsync reference import <name>`)."""

    dataset: str

    async def count(self, *, full: bool) -> int:
        """How many rows the next import would read (a progress bar's total)."""
        ...

    async def import_rows(
        self, *, full: bool, progress: Callable[[ImportResult], None] | None = None
    ) -> ImportResult:
        """Import now: every row, deleting those the source lacks, when `full`; otherwise what
        changed since the last import (a kind that cannot tell imports everything)."""
        ...


class AdapterConfigError(ValueError):
    """A bad `[adapters.<name>]` entry: the message names the adapter and the key."""

    def __init__(self, adapter: str, key: str | None, message: str) -> None:
        where = f"adapters.{adapter}" + (f".{key}" if key else "")
        super().__init__(f"{where}: {message}")
        self.adapter = adapter
        self.key = key
