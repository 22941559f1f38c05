"""What crosses the storage seam: the records a backend keeps and the Protocols it implements."""

from __future__ import annotations

from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fieldsync.records import DocIndex, FieldChange, Origin, ScopeFilter


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    id: int  # orders the changes of one update (one seq)
    seq: int
    at: float
    actor: str
    origin: Origin
    change: FieldChange


@dataclass(frozen=True, slots=True)
class Write:
    """One update to commit: the effective Yjs update bytes (only what was new to the document),
    who made it, and the document's new index when the update changed it (None: unchanged)."""

    doc: str
    data: bytes
    origin: Origin
    actor: str  # principal subject
    index: DocIndex | None = None
    history: tuple[FieldChange, ...] = ()  # what changed, for `field_history`
    # The fencing token of the writer's lease on `doc` (cluster mode, `storage.Leases`): the
    # PostgreSQL append refuses the write unless it is the document's current, unexpired one.
    # None: no lease (one node owns every document; SQLite never reads it).
    fence: int | None = None
    # Whether anything waits for this commit: an ack, an HTTP answer, a fan-out held for it.
    # A write nothing waits for (a y-websocket author's, already relayed) lets the writer
    # gather a fuller group commit around it (SQLite: up to `_sqlite._RELAXED_DELAY`).
    awaited: bool = True


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
class FeedPage:
    """What committed after `since`, up to `upto`, as a node that did not make those commits
    needs it (`Documents.follow`): the scope index of every changed document's work order, and
    each work order created or moved to another scope, with the seq of that change, in seq
    order (its `before` and `after` hold the scope columns, the rest None). `more`: another
    page follows from `upto`."""

    since: int
    upto: int
    changed: list[DocIndex]
    scope_changes: list[tuple[int, ScopeChange]]
    more: bool = False


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    device_id: str
    subject: str
    platform: str
    version: str
    last_seq: int
    # The user's team and region when it connected, for the supervisors' view of the devices.
    team: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device as last seen: who used it, with which app, when, and how far it had synced."""

    device_id: str
    subject: str
    platform: str | None
    version: str | None
    last_seen: float
    last_seq: int
    # The user's team and region when it last connected (the dashboards' devices view).
    team: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class Conflict:
    """A domain rule's correction of a merged document: who, what, which rule, the resolution.
    The scope columns are the work order's when it happened, so supervisors list their own."""

    doc: str
    rule: str
    detail: str
    actor: str
    origin: Origin  # the author's: the device (or other writer) whose update was corrected
    team: str | None = None
    region: str | None = None
    assignee: str | None = None


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    id: int
    seq: int  # the change sequence when it was recorded
    at: float
    conflict: Conflict


class Documents(Protocol):
    """Documents and their change feed: the update log, snapshots, the index row of each
    document, and the change sequence that numbers every commit. Every method is safe to call on
    the event loop: blocking work happens on the backend's own threads."""

    def append(self, write: Write) -> Awaitable[Committed]:
        """Queue `write` and return an awaitable resolved once it is durably committed.

        Writes are committed in the order `append` was called (group-committed: many writes, one
        transaction). Calling `append` does not suspend, so a caller may pipeline writes."""
        ...

    async def load(self, doc: str) -> StoredDoc | None: ...

    async def load_many(self, docs: Sequence[str]) -> dict[str, StoredDoc | None]:
        """`load` of each of `docs` in one read (one snapshot): a device that syncs thousands of
        documents after a restart pays one round trip to the database per batch, not per
        document."""
        ...

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

    async def follow(self, since: int, limit: int) -> FeedPage:
        """Every change after `since`, at most `limit` documents' worth, for a node following
        the commits of the others (cluster mode); never skips, as `changes` never does."""
        ...

    async def forms(self, wo: str) -> list[str]:
        """The form documents that belong to work order `wo`."""
        ...

    async def stats(self) -> dict[str, int]:
        """Counts an operator can check: docs, updates (log rows), snapshots, devices, head
        seq, commits."""
        ...


class FieldHistory(Protocol):
    """Every field change, written with the update that made it (`Write.history`)."""

    async def history(
        self, doc: str, path: str | None, before: tuple[int, int] | None, limit: int
    ) -> list[HistoryEntry]:
        """The field changes of `doc` (of one `path`, or its sub-paths, when given), newest
        first, after the (seq, id) position `before` when given."""
        ...


class ConflictLog(Protocol):
    """The corrections domain rules made, for supervisors to review."""

    def record_conflict(self, conflict: Conflict, fence: int | None = None) -> None:
        """Keep a rule's correction; written with the next group commit, not awaited. `fence`:
        the corrector's lease token on the document (`Write.fence`); a stale owner's record is
        left out, as its correction is."""
        ...

    async def conflicts(
        self, scope: ScopeFilter, before_id: int | None, limit: int
    ) -> list[ConflictRecord]:
        """Conflicts of documents in `scope`, newest first, older than `before_id`."""
        ...


class Devices(Protocol):
    """When each device last connected, for the offline limit and the supervisors' view."""

    def touch_device(self, seen: DeviceSeen) -> None:
        """Record a device's last contact; written with the next group commit, not awaited."""
        ...

    async def last_seen(self, device_id: str, subject: str) -> float | None:
        """When this subject's device last connected (epoch seconds), None if never."""
        ...

    async def devices(self, subject: str | None = None, limit: int = 1000) -> list[DeviceRecord]:
        """The devices (of one subject, when given), most recently seen first."""
        ...

    async def devices_in(self, scope: ScopeFilter, limit: int) -> list[DeviceRecord]:
        """The devices whose user was in `scope` when they last connected (by team, region or
        subject), most recently seen first, at most `limit`."""
        ...


class Store(Documents, FieldHistory, ConflictLog, Devices, Protocol):
    """What the write path and its sessions use: the four concerns that share the group commit
    (a field change, a conflict and a device's contact are written with the updates)."""


# --- the screens' read model (DESIGN.md §5) ---------------------------------------------------

# Where a keyset page starts: just after this (sort key, document id). Ids break ties, so a page
# boundary is exact however many documents share a sort key, and documents inserted while a
# client pages never shift what it has still to read.
Position = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Card:
    """A work order as a list shows it, read from `doc_index` (never from the document)."""

    id: str
    number: str | None
    title: str | None
    status: str | None
    priority: str | None
    due_at: str | None
    site: str | None
    asset_id: str | None
    asset_name: str | None  # from the `assets` reference data, None without it
    assignee: str | None


@dataclass(frozen=True, slots=True)
class CardPage:
    cards: list[Card]
    next: Position | None  # where the next page starts; None: this is the last page
    # Work orders per status over the whole list before its status filter (team queue only).
    counts: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class TeamMetrics:
    """One team's aggregates; see `Screens.region_metrics` for the definitions."""

    team: str | None
    total: int
    by_status: dict[str, int]
    overdue: int
    completed: int
    mean_seconds_to_complete: float | None
    first_time_fix_rate: float | None
    conflicts_24h: int | None


@dataclass(frozen=True, slots=True)
class MetricsPage:
    teams: list[TeamMetrics]
    next: str | None  # the last team of this page, None on the last page


@dataclass(frozen=True, slots=True)
class WorkOrderRefs:
    """What the detail screen shows beside the document: its forms' ids (at most the limit
    asked, by id) and its asset's reference row (None when absent or no reference data)."""

    forms: list[str]
    asset: dict[str, Any] | None


class Screens(Protocol):
    """The backend-for-frontend's queries: one read, one snapshot, per screen."""

    async def my_work(
        self, subject: str, scope: ScopeFilter, after: Position | None, limit: int
    ) -> CardPage:
        """Work orders assigned to `subject` inside `scope`, by due time (none last), then id."""
        ...

    async def team_queue(
        self,
        scope: ScopeFilter,
        *,
        status: str | None,
        assignee: str | None,
        after: Position | None,
        limit: int,
    ) -> CardPage:
        """Work orders inside `scope`, optionally of one status and one assignee, by due time;
        `counts` per status with the assignee filter applied and the status filter not."""
        ...

    async def region_metrics(
        self, scope: ScopeFilter, *, now: float, after: str | None, limit: int
    ) -> MetricsPage:
        """Per team inside `scope` (by team name): work orders by status; overdue (due before
        `now` and not completed, closed or cancelled; a due date without a time is due at the
        end of that day, UTC); completed (status completed or closed); mean seconds from
        creation (first stored update) to the last entry into completed, over the completed
        ones whose times are known; first-time-fix rate: the share of completed work orders
        never moved from completed or closed back to an open status; conflicts recorded in
        the 24 hours before `now` (None when no conflict log exists)."""
        ...

    async def work_order_refs(self, wo: str, forms_limit: int) -> WorkOrderRefs: ...

    async def open_work_orders(self, asset_id: str, limit: int) -> list[str]:
        """At most `limit` work orders of the asset not completed, closed or cancelled, newest
        first (in every scope: the server's own adapters ask, not a person)."""
        ...

    async def cursor_key(self) -> bytes:
        """A secret kept in the database, the same for every node that shares it: the key
        pagination cursors are authenticated with."""
        ...


_T = TypeVar("_T")

# Reference data (DESIGN.md §2, §5): datasets adapters import and devices only read.


class InvalidRow(ValueError):
    """A reference row that cannot be imported (not an object, no usable key, not JSON); the
    message names its position. Rows before its chunk stay imported."""


class ResyncRequired(Exception):
    """`since` is older than the dataset's retention horizon (its changes were compacted) or
    newer than anything this server has committed: the reader must start from a snapshot."""

    def __init__(self, dataset: str, since: int, horizon: int) -> None:
        super().__init__(f"{dataset}: changes since {since} are not available (horizon {horizon})")
        self.dataset = dataset
        self.since = since
        self.horizon = horizon


@dataclass(frozen=True, slots=True)
class RowChange:
    """A row's net change over a page of the change log: `fields` are new values; when `whole`
    is true they are the entire row (created, or re-created after a delete) and replace what the
    reader holds; otherwise they patch it, and `removed` lists fields that no longer exist."""

    key: str
    fields: dict[str, Any]
    removed: tuple[str, ...] = ()
    whole: bool = False


@dataclass(frozen=True, slots=True)
class ReferencePage:
    """The row changes of one dataset in (`since`, `next`]; each changed key appears once,
    either in `changes` or in `deleted`. `more`: ask again from `next` for the rest."""

    dataset: str
    since: int
    next: int
    changes: list[RowChange]
    deleted: list[str]
    more: bool


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import did so far (`done` false: a progress report between chunks)."""

    dataset: str
    full: bool
    rows: int = 0  # rows read
    created: int = 0
    updated: int = 0  # rows with at least one changed field
    deleted: int = 0  # rows a full import did not contain
    unchanged: int = 0
    # Keys given again (the last row counts): within a chunk, and across a whole full import.
    duplicates: int = 0
    seq: int = 0  # the last change sequence number drawn, 0 when nothing changed
    done: bool = False


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    dataset: str
    seq: int  # its last change
    horizon: int  # the oldest `since` its change log still answers
    rows: int


@dataclass(frozen=True, slots=True)
class SnapshotHead:
    """A snapshot's header: its rows are the dataset exactly as of the global change sequence
    `seq`, so a reader continues with the changes since `seq`."""

    dataset: str
    seq: int
    rows: int


class ReferenceStore(Protocol):
    """Reference datasets: rows, a field-level change log numbered from the global change
    sequence, and its compaction. Every method is safe to call on the event loop."""

    async def import_rows(
        self,
        dataset: str,
        rows: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        key: str = "id",
        full: bool,
        progress: Callable[[ImportResult], None] | None = None,
    ) -> ImportResult:
        """Store `rows` (each the whole new state of the row whose `key` field names it),
        recording only the fields that really changed. A full import also deletes the rows it
        did not contain, once every row has been read; a partial one touches only the rows
        given. Applied in chunks, each its own transaction, with `progress` called after each;
        an `InvalidRow` stops the import before its chunk is written."""
        ...

    async def changes(self, dataset: str, since: int, limit: int) -> ReferencePage:
        """At most `limit` row changes after `since`, merged per key; raises `ResyncRequired`."""
        ...

    async def snapshot(
        self, dataset: str, consume: Callable[[SnapshotHead, Iterator[tuple[str, str]]], _T]
    ) -> _T:
        """Call `consume` with the header and the rows (key, JSON object text, by key) of one
        consistent snapshot, on a thread of the backend's: it must not touch the event loop."""
        ...

    async def compact(self, before: float) -> dict[str, int]:
        """Drop the change log entries committed before the epoch time `before`; return each
        dataset's horizon."""
        ...

    async def rows(self, dataset: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored rows of `keys` (key -> row) that exist, from one snapshot."""
        ...

    async def info(self, dataset: str) -> DatasetInfo | None: ...

    async def datasets(self) -> list[DatasetInfo]: ...
