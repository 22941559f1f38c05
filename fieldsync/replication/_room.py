"""A room: one document loaded in memory, with the peers that replicate it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pycrdt import Array, Doc, TransactionEvent, get_update, merge_updates

from fieldsync import documents
from fieldsync.errors import ErrorCode, FieldsyncError, ProtocolError
from fieldsync.records import DocIndex, FieldChange, Origin, OriginKind
from fieldsync.replication._awareness import Awareness
from fieldsync.replication._codec import Reader, state_entries, varuint_value
from fieldsync.storage import StoredDoc

if TYPE_CHECKING:
    from fieldsync.replication._peer import Peer
    from fieldsync.replication._replicator import Owner

_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)
# Updates accepted after the document's encoded state was last taken for `Room.refuse`: past
# this many it is taken again (a copy of the document per this many updates, not per update).
_REBASE_AFTER = 256


class InvalidUpdate(FieldsyncError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_UPDATE, message)


class Incomplete(FieldsyncError):
    """An update a checked writer sent before what it builds on: part of it would wait in the
    replica and take effect later, unchecked, when the missing update arrives (an attacker can
    anchor an edit of a forbidden field on a supervisor's next edit). The device resyncs."""

    def __init__(self, doc_id: str) -> None:
        super().__init__(
            ErrorCode.RESYNC_REQUIRED,
            f"{doc_id}: the update builds on changes the server does not have; resync",
        )


def integrated(update: bytes, state: bytes) -> bool:
    """Whether all of `update` took effect on a replica now at `state`: no struct waiting for
    an origin or an earlier clock, no deletion of what is not there yet."""
    rest = get_update(update, state)  # the update's structs the replica lacks, then deletions
    if rest[0]:  # a v1 update starts with its count of clients with structs
        return False
    clocks = state_entries(state)
    reader = Reader(rest, 1)
    for _ in range(reader.varuint()):
        start = reader.pos
        reader.varuint()  # the client id, looked up as encoded
        known = clocks.get(rest[start : reader.pos])
        held = 0 if known is None else varuint_value(known)
        for _ in range(reader.varuint()):
            clock, length = reader.varuint(), reader.varuint()
            if clock + length > held:
                return False
    return True


def check_count(data: bytes, what: str) -> None:
    """Refuse a state vector or update whose leading entry count exceeds its bytes. yrs reserves
    memory for that count before reading a single entry: eight bytes claiming 2^29 entries cost
    it a gigabyte and most of a second of the event loop (pycrdt 0.14). Every entry takes at
    least one byte, so no valid input is refused."""
    reader = Reader(data)
    try:
        count = reader.varuint()
    except ProtocolError:
        raise InvalidUpdate(f"the {what} could not be decoded") from None
    if count > reader.remaining:
        raise InvalidUpdate(f"the {what} claims {count} entries in {reader.remaining} bytes")


class Room:
    """A document in memory. `subscribers` receive its updates; `pending` asked for a document
    that does not exist yet and hear nothing until it exists and proves to be in their scope."""

    def __init__(self, doc_id: str, stored: StoredDoc | None) -> None:
        self.doc_id = doc_id
        self.type = documents.doc_type(doc_id)
        self.ydoc: Doc[Any] = Doc()
        self.subscribers: dict[Peer, None] = {}  # an ordered set
        self.pending: dict[Peer, None] = {}
        self.awareness: Awareness[Peer] = Awareness()
        self.in_flight = 0  # updates applied in memory, not yet committed
        self.tail: asyncio.Future[Any] | None = None  # the commit of the last applied update
        self.held = 0  # commits in flight whose fan-out waits for them (`Replicator._commit`)
        self.poisoned = False  # pycrdt panicked mid-apply: the state can no longer be trusted
        self.last_used = time.monotonic()
        self._emitted: list[bytes] = []
        self.ydoc.observe(self._on_transaction)
        self.seq = 0
        self.size = 0  # stored bytes: what `max_doc_bytes` limits
        # Cluster mode: the fencing token of this node's lease, carried by every commit; or,
        # for a document another node owns, that node (this room is then only a proxy: its
        # subscribers are served there, its own content stays empty).
        self.fence: int | None = None
        self.owner: Owner | None = None
        self.index: DocIndex | None = None
        self._index_root = documents.index_root(self.type)
        self._index_keys = documents.index_keys(self.type)
        if stored is not None:
            for data in ([stored.snapshot] if stored.snapshot else []) + stored.updates:
                self.ydoc.apply_update(data)
                self.size += len(data)
            self.seq = stored.seq
            self.index = stored.index
        self._emitted.clear()
        # From the first write on, every change is recorded for the field history (watched
        # from then: a room only read, as most are, holds no subscriptions).
        self._watched: documents.Watched | None = None
        self._changes: list[FieldChange] = []
        self._parsed: dict[str, Any] = {}  # root -> its content as plain data, until it changes
        # An update is applied to the document before it is judged; one that is refused, or
        # that breaks the document, is undone by rebuilding it from `_base` (its encoded state,
        # taken when first needed) and the updates accepted since. One apply per update, where
        # a scratch replica beside the document cost two and a second copy in memory.
        self._base: bytes | None = None
        self._since: list[bytes] = []
        self._tentative = False  # an update is applied and not yet accepted or refused

    @property
    def exists(self) -> bool:
        return self.seq > 0 or self.in_flight > 0

    @property
    def idle(self) -> bool:
        return not self.subscribers and not self.pending and not self.in_flight

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._emitted.append(event.update)

    def written(self, update: bytes) -> list[FieldChange]:
        """Apply `update` to the document, tentatively, and return what it changed, for the
        checks to judge: `apply` then accepts it, `refuse` undoes it. Nothing awaits between
        the two, so no one else ever sees a tentative state. Raises `InvalidUpdate`, and
        `Incomplete` for an update that builds on changes the room does not have (its waiting
        structs would take effect later, unchecked); both leave the document as it was."""
        changes = self._take(update)
        if not integrated(update, self.ydoc.get_state()):
            self.refuse()
            raise Incomplete(self.doc_id)
        return changes

    def _take(self, update: bytes) -> list[FieldChange]:
        """Apply `update` and read what it changed; undone if it raises."""
        if self._base is None:
            self._base = self.ydoc.get_update()
        self._tentative = True
        try:
            return self._watcher().written(update)
        except BaseException as exc:
            # pyo3 panics derive from BaseException (DESIGN.md §9); only true exits pass through.
            if isinstance(exc, _FATAL):
                raise
            # Decoding fails with ValueError before anything is integrated; a panic, or an
            # error raised after yrs integrated part of the update (pycrdt 0.14: RuntimeError
            # "block parent must be deleted or shared ref type"), leaves the document changed
            # in a way the emitted update does not always reproduce: it is rebuilt.
            if isinstance(exc, ValueError) and not self._emitted:
                self._tentative = False
            self.refuse()
            raise InvalidUpdate(f"the update could not be decoded: {type(exc).__name__}") from None

    def tentative_index(self) -> DocIndex:
        """The index of the document with the update `written` just applied."""
        return documents.index(self.doc_id, self.ydoc)

    def refuse(self) -> None:
        """Undo the update `written` applied (if any): the document is rebuilt as it was."""
        self._emitted.clear()
        if not self._tentative:
            return
        self._tentative = False
        self._parsed.clear()
        base = self._base
        assert base is not None, "`_take` takes the base before it applies"
        rebuilt: Doc[Any] = Doc(client_id=self.ydoc.client_id)
        try:
            for data in [base, *self._since]:
                rebuilt.apply_update(data)
        except BaseException as exc:
            if isinstance(exc, _FATAL):
                raise
            self.poisoned = True  # what it held once no longer applies: it cannot be trusted
            raise InvalidUpdate(
                f"the document could not be rebuilt: {type(exc).__name__}"
            ) from None
        rebuilt.observe(self._on_transaction)
        self.ydoc = rebuilt
        self._watched = None
        self._emitted.clear()

    def _watcher(self) -> documents.Watched:
        if self._watched is None:
            self._watched = documents.Watched(self.ydoc, documents.roots(self.type))
        return self._watched

    def _accepted(self, effective: bytes) -> None:
        self._tentative = False
        self._since.append(effective)
        if len(self._since) >= _REBASE_AFTER:
            self._base, self._since = None, []  # taken again before the next update

    def apply(self, update: bytes, *, read: list[FieldChange] | None = None) -> bytes | None:
        """Accept `update`; return what it added (the effective update to store and broadcast),
        or None when it added nothing (already known, or waiting on updates not received yet).
        `read`: what `written` read of it, having applied it already; else it is applied now.
        Raises `InvalidUpdate`, leaving the document as it was."""
        self.last_used = time.monotonic()
        changes = read if read is not None and self._tentative else self._take(update)
        if not self._emitted:
            self._accepted(update)  # what waits in the document for what it builds on, if any
            return None
        self._record(changes)
        emitted = self._emitted
        effective = emitted[0] if len(emitted) == 1 else merge_updates(*emitted)
        self._emitted.clear()
        self.size += len(effective)
        self._accepted(effective)
        return effective

    def _record(self, changes: list[FieldChange]) -> None:
        roots = documents.roots(self.type)
        for change in changes:
            root = change.path.split(".", 1)[0]
            if root not in roots:
                continue
            self._changes.append(change)
            parsed = self._parsed.get(root)
            if parsed is not None and change.path == root and isinstance(change.new, list):
                documents.follow(parsed, change.new)  # an append to a log, mostly
            else:
                self._parsed.pop(root, None)  # read again when next needed

    def read(self, root: str) -> Any:
        """A root array's content as plain data. Parsed once per change of the root: the rules
        read the same logs on every update, and most updates change none of them."""
        parsed = self._parsed.get(root)
        if parsed is None:
            parsed = self._parsed[root] = documents.data(self.ydoc.get(root, type=Array))
        return parsed

    def write(self, change: Callable[[Doc[Any]], Any]) -> bytes | None:
        """Make a server-side change (a rule's correction) in one transaction; returns the
        update it made, None if it changed nothing."""
        if self._base is None:
            self._base = self.ydoc.get_update()
        watched = self._watcher()
        with self.ydoc.transaction(origin=Origin(OriginKind.RULES)):
            change(self.ydoc)
        changes = watched.changed()
        if not self._emitted:
            return None
        emitted = self._emitted
        effective = emitted[0] if len(emitted) == 1 else merge_updates(*emitted)
        self._emitted = []
        self.size += len(effective)
        self._record(changes)
        self._accepted(effective)
        return effective

    def touched(self) -> frozenset[str]:
        """The paths changed since the last `take_changes`."""
        return frozenset(change.path for change in self._changes)

    def take_changes(self) -> tuple[FieldChange, ...]:
        """The field changes made since the last call: what the next commit records."""
        changes = tuple(self._changes)
        self._changes.clear()
        return changes

    def index_touched(self, changes: Iterable[FieldChange]) -> bool:
        """Whether `changes` write a key the index reads (most edits write none: a checklist
        tick, a note, a field the screens do not filter on), or the index root as a whole."""
        root, keys = self._index_root, self._index_keys
        for change in changes:
            head, _, rest = change.path.partition(".")
            if head == root and (not rest or rest.partition(".")[0] in keys):
                return True
        return False

    def reindex(self) -> DocIndex | None:
        """The document's index if the last updates changed it, else None."""
        if self.index is not None and not self.index_touched(self._changes):
            return None  # the changes recorded since the last commit left what it reads alone
        current = documents.index(self.doc_id, self.ydoc)
        if current == self.index:
            return None
        self.index = current
        return current

    def diff(self, state_vector: bytes) -> bytes:
        return diff(self.ydoc, state_vector)

    def state_vector(self) -> bytes:
        return self.ydoc.get_state()

    def to_json(self) -> dict[str, Any]:
        return documents.to_json(self.doc_id, self.ydoc)


def diff(doc: Doc[Any], state_vector: bytes) -> bytes:
    """What a replica at `state_vector` lacks of `doc`; a state vector that does not decode is
    an `InvalidUpdate`, whichever document it is read against."""
    check_count(state_vector, "state vector")
    try:
        return doc.get_update(state_vector)
    except BaseException as exc:
        if isinstance(exc, _FATAL):
            raise
        raise InvalidUpdate("the state vector could not be decoded") from None


def preview(update: bytes) -> Doc[Any]:
    """A new document as `update` would make it, on a scratch copy, so that nothing of a
    refused creation reaches the room."""
    scratch: Doc[Any] = Doc()
    try:
        scratch.apply_update(update)
    except BaseException as exc:
        if isinstance(exc, _FATAL):
            raise
        raise InvalidUpdate(f"the update could not be decoded: {type(exc).__name__}") from None
    return scratch
