"""What crosses the storage seam: the records a backend keeps and the `Store` protocol."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class ScopeKind(StrEnum):
    ASSIGNEE = "assignee"
    TEAM = "team"
    REGION = "region"
    ALL = "all"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class ScopeFilter:
    """Which documents a reader may see, in terms storage can query: a work order is visible when
    its `kind` column equals `value` (`all`: every document, `none`: nothing); a form is visible
    exactly when its work order is."""

    kind: ScopeKind
    value: str | None = None


@dataclass(frozen=True, slots=True)
class DocIndex:
    """The projection of a document's fields that scopes and screens filter on.

    For a work order `wo` is its own id; for a form it is the work order the form belongs to
    (forms inherit that work order's scope), and the scope columns are None.
    """

    doc: str
    type: str
    wo: str | None
    assignee: str | None = None
    team: str | None = None
    region: str | None = None
    status: str | None = None
    number: str | None = None
    title: str | None = None
    priority: str | None = None
    due_at: str | None = None


@dataclass(frozen=True, slots=True)
class Write:
    """One update to commit: the effective Yjs update bytes (only what was new to the document),
    who made it, and the document's new index when the update changed it (None: unchanged)."""

    doc: str
    data: bytes
    origin: str  # "device:<device id>", "server", "adapter:<name>"
    actor: str  # principal subject
    index: DocIndex | None = None


@dataclass(frozen=True, slots=True)
class ScopeChange:
    """A work order whose scope columns changed in a commit (or that was created); `forms` are the
    form documents that belong to it and so moved with it."""

    doc: str
    before: DocIndex | None
    after: DocIndex
    forms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Committed:
    seq: int  # the change sequence number given to this update
    scope_change: ScopeChange | None = None


@dataclass(frozen=True, slots=True)
class StoredDoc:
    """Everything needed to rebuild a document: the compacted snapshot (None before the first
    compaction) and the updates logged after it, in sequence order; `seq` is the last one."""

    snapshot: bytes | None
    updates: list[bytes]
    seq: int
    index: DocIndex | None


@dataclass(frozen=True, slots=True)
class ChangedDoc:
    id: str
    type: str
    seq: int


@dataclass(frozen=True, slots=True)
class ChangesPage:
    """Documents in scope changed after `since`, ordered by seq; `upto` is the `since` to ask for
    next. `removed` lists documents that left the reader's scope after `since`."""

    since: int
    upto: int
    docs: list[ChangedDoc]
    removed: list[str] = field(default_factory=list)
    more: bool = False


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    device_id: str
    subject: str
    platform: str
    version: str
    last_seq: int


class Store(Protocol):
    """A durable document store. Every method is safe to call on the event loop: blocking work
    happens on the backend's own threads."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def append(self, write: Write) -> Awaitable[Committed]:
        """Queue `write` and return an awaitable resolved once it is durably committed.

        Writes are committed in the order `append` was called (group-committed: many writes, one
        transaction). Calling `append` does not suspend, so a caller may pipeline writes."""
        ...

    async def load(self, doc: str) -> StoredDoc | None: ...

    async def index(self, doc: str) -> DocIndex | None:
        """The document's index row, None if the document does not exist."""
        ...

    async def scope_index(self, doc: str) -> DocIndex | None:
        """The index row that decides who sees `doc`: its own for a work order, its work order's
        for a form (None when the document or, for a form, its work order does not exist)."""
        ...

    async def changes(self, scope: ScopeFilter, since: int, limit: int) -> ChangesPage: ...

    async def head(self) -> int:
        """The highest committed change sequence number (0 when empty)."""
        ...

    def touch_device(self, seen: DeviceSeen) -> None:
        """Record a device's last contact; written with the next group commit, not awaited."""
        ...

    async def stats(self) -> dict[str, int]:
        """Counts an operator can check: docs, updates (log rows), snapshots, head seq."""
        ...
