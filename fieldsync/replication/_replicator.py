"""The one write path for documents, and the rooms it keeps in memory.

authorise -> apply -> rules -> commit -> ack -> fan-out (DESIGN.md §1); a peer's update is
fanned out as soon as it is applied, before its commit (see `_commit`). A connected replica (a
device over v1, a Yjs client over y-websocket) writes through `submit`; a document the server
builds for someone (REST's `POST /v1/work-orders`) comes into existence through `create`, held to
the creation rights a device's first update is, and committed and fanned out the same way. Every
write carries its `Origin`, and the rules never judge their own corrections.

**Cluster mode** (`leases`, `owners`): a room is loaded only under the document's lease
(`storage.Leases`), and every commit carries the lease's fencing token, so one node at a time
merges, judges and stores a document. A document whose lease another node holds is served
through that node (`Owners`, the node-to-node links): the replicator keeps a proxy room for it
whose subscribers are this node's peers, and forwards their subscribe, read, submit, durable
state vector, awareness and unsubscribe; the owner calls the peers back through the link.
Sessions, REST and adapters call the same methods either way. Without leases (one node, SQLite)
every document is this node's and none of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pycrdt import Doc

from fieldsync import documents
from fieldsync.auth import Policy, Principal, in_scope
from fieldsync.documents import DocType, form_templates
from fieldsync.documents import work_order_rules as rules
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.periodic import Periodic
from fieldsync.records import (
    UNOBSERVED,
    DocIndex,
    FieldChange,
    Observer,
    Origin,
    OriginKind,
    ScopeFilter,
)
from fieldsync.replication._codec import SyncStep, encode_sync
from fieldsync.replication._peer import Peer
from fieldsync.replication._room import InvalidUpdate, Room, check_count, diff, preview
from fieldsync.storage import (
    Committed,
    Conflict,
    Lease,
    LeaseLost,
    Leases,
    ScopeChange,
    StorageError,
    Store,
    Write,
)

log = logging.getLogger(__name__)

_EMPTY_STATE = b"\x00"  # the state vector of an empty document
RULES_ORIGIN = Origin(OriginKind.RULES)  # rules never run on updates of this origin


class Forbidden(FieldsyncError):
    def __init__(self, doc_id: str) -> None:
        super().__init__(ErrorCode.FORBIDDEN, f"{doc_id}: not in your scope")


class ForbiddenField(FieldsyncError):
    def __init__(self, doc_id: str, paths: list[str], why: str | None = None) -> None:
        super().__init__(
            ErrorCode.FORBIDDEN_FIELD,
            f"{doc_id}: {why or 'your role may not write ' + ', '.join(paths)}",
            paths=paths,
        )


class AlreadyExists(FieldsyncError):
    def __init__(self, doc_id: str) -> None:
        super().__init__(ErrorCode.ALREADY_EXISTS, f"{doc_id} exists already")


class DocTooLarge(FieldsyncError):
    def __init__(self, doc_id: str, limit: int) -> None:
        super().__init__(ErrorCode.DOC_TOO_LARGE, f"{doc_id}: the document would exceed {limit} B")


@dataclass(frozen=True, slots=True)
class Submitted:
    """An accepted update: `committed` resolves once it is durable (None: it added nothing and
    nothing is in flight); `state_vector` is the room's right after it was applied, `before`
    right before."""

    committed: asyncio.Future[Committed] | None
    state_vector: bytes
    before: bytes = _EMPTY_STATE


class Elsewhere(Exception):
    """The document's lease is another node's: its room lives there."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"{lease.doc} is owned by node {lease.node}")
        self.lease = lease


class OwnerUnavailable(FieldsyncError):
    """The node that owns the document could not be reached, or no longer owns it. The device
    resyncs the document (`resync_required`: a session resets it), which sends its edits not
    yet acknowledged again, to wherever the document's owner then is."""

    def __init__(self, doc_id: str) -> None:
        super().__init__(
            ErrorCode.RESYNC_REQUIRED, f"{doc_id}: its owner node is unreachable; resync"
        )


class Owner(Protocol):
    """Another node that owns documents, as this node reaches it (a node-to-node link). Each
    call acts for `peer`, a peer of this node; the owner authorises it with its own policy and
    calls it back (send_doc, confirmed, rule_violation, reset, scope changes) through the link.
    Raises what the owner's replicator raised, or `OwnerUnavailable`."""

    async def subscribe(self, peer: Peer, doc_id: str) -> None: ...

    async def read(self, peer: Peer, doc_id: str, state_vector: bytes) -> bytes: ...

    async def submit(self, peer: Peer, doc_id: str, update: bytes) -> tuple[Submitted, int]:
        """The owner's answer, and the document's change seq as it stood."""
        ...

    async def durable_state_vector(self, peer: Peer, doc_id: str) -> bytes: ...

    def relay_awareness(self, peer: Peer, doc_id: str, payload: bytes) -> None: ...

    def unsubscribe(self, peer: Peer, doc_id: str) -> None: ...

    async def create(
        self, doc_id: str, update: bytes, principal: Principal, origin: Origin
    ) -> Committed: ...

    async def recheck(self, doc_id: str, author: Peer) -> None:
        """Judge the work order `doc_id` again (one of its forms changed)."""
        ...


class Owners(Protocol):
    """The other nodes of the cluster."""

    def owner(self, lease: Lease) -> Owner:
        """The node holding `lease` (another node's)."""
        ...


class Replicator:
    def __init__(
        self,
        store: Store,
        *,
        policy: Policy | None = None,
        templates: form_templates.Templates | None = None,
        rules: documents.RuleSet | None = None,
        max_doc_bytes: int = 16 << 20,
        idle_seconds: float = 30.0,
        max_rooms: int = 10_000,
        observer: Observer = UNOBSERVED,
        leases: Leases | None = None,
    ) -> None:
        self.store = store
        # Cluster mode: the leases rooms are loaded under, and the nodes that own the others
        # (set by the wiring once the links exist). None: this node owns every document.
        self.leases = leases
        self.owners: Owners | None = None
        self._proxies: dict[str, Room] = {}  # documents other nodes own, with our subscribers
        self._renewer = (
            Periodic("lease-renewer", leases.renew_every, self._renew) if leases else None
        )
        self.observer = observer  # acks, refusals and corrections, for the metrics
        self.policy = policy or Policy.load()
        self.templates = templates or form_templates.Templates.load()
        # The domain rules run after each merge; `documents.NO_RULES` measures what they cost.
        self.rules: documents.RuleSet = rules or documents.DomainRules(self.templates)
        self.max_doc_bytes = max_doc_bytes
        self.idle_seconds = idle_seconds
        self.max_rooms = max_rooms
        self.peers: dict[Peer, None] = {}
        self._rooms: dict[str, Room] = {}
        self._loading: dict[str, asyncio.Future[Room]] = {}
        self._evictor = Periodic("room-evictor", max(idle_seconds / 4, 0.05), self._evict_idle)
        self._tasks: set[asyncio.Task[None]] = set()
        self._moving = 0  # scope-moving commits in flight: fan-out waits for commits meanwhile
        # Called after each commit's fan-out, with the room and what the commit stored (the
        # dashboards' live views); a hook never suspends and never raises.
        self.commit_hooks: list[Callable[[Room, Committed], None]] = []

    async def start(self) -> None:
        if self.leases is not None and self._renewer is not None:
            await self.leases.open()
            self._renewer.start()
        self._evictor.start()

    async def stop(self) -> None:
        await self._evictor.stop()
        # Wait for what is applied but not yet committed: a room's tail commits after all its
        # earlier updates.
        tails = [room.tail for room in self._rooms.values() if room.in_flight and room.tail]
        if tails:
            await asyncio.wait(tails)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.leases is not None and self._renewer is not None:
            await self._renewer.stop()
            # What this node owned is free at once for the others: their devices need not
            # wait for the leases to expire.
            with contextlib.suppress(StorageError):
                await self.leases.close()

    @property
    def loaded(self) -> int:
        return len(self._rooms)

    # --- rooms --------------------------------------------------------------------------

    async def room(self, doc_id: str) -> Room:
        """The document's room, for reading it (REST, adapters): this node's, or, when another
        node owns the document, what storage holds of it (committed state; not kept)."""
        try:
            return await self._owned(doc_id)
        except Elsewhere:
            stored = await self.store.load(doc_id)
            return await asyncio.to_thread(Room, doc_id, stored)

    async def _owned(self, doc_id: str) -> Room:
        """This node's room of the document, loaded under its lease. Raises `Elsewhere` when
        another node holds the lease."""
        room = self._rooms.get(doc_id)
        if room is not None and not room.poisoned:
            room.last_used = time.monotonic()
            return room
        loading = self._loading.get(doc_id)
        if loading is not None:
            return await asyncio.shield(loading)
        loading = asyncio.get_running_loop().create_future()
        self._loading[doc_id] = loading
        try:
            fence = None
            if self.leases is not None:
                lease = await self.leases.claim(doc_id)
                if not lease.ours:
                    raise Elsewhere(lease)
                fence = lease.token
            # Loaded after the claim: a previous owner's last commit has settled by then (the
            # append holds the lease row it checks; `storage.Leases`).
            stored = await self.store.load(doc_id)
            # Replaying a long log is CPU work: keep it off the event loop.
            room = await asyncio.to_thread(Room, doc_id, stored)
            room.fence = fence
            self._rooms[doc_id] = room
            loading.set_result(room)
            return room
        except BaseException as exc:
            loading.set_exception(exc)
            loading.exception()  # retrieved: a loader nobody else waits on must not warn
            raise
        finally:
            del self._loading[doc_id]

    async def load_rooms(self, doc_ids: Sequence[str]) -> None:
        """Bring the rooms of `doc_ids` into memory, those not there yet read from storage in
        one read and built in one thread hop: a device syncing thousands of documents after a
        restart would otherwise wait for two hops per document. Loads only: access is still
        decided per document by `subscribe`."""
        if self.leases is not None:
            # Cluster mode: a room is loaded only under its document's lease, one by one
            # through `_owned`. Claiming leases in bulk is what would share the loading there.
            return
        missing = [
            doc_id
            for doc_id in dict.fromkeys(doc_ids)
            if doc_id not in self._loading
            and ((room := self._rooms.get(doc_id)) is None or room.poisoned)
        ]
        if not missing:
            return
        loop = asyncio.get_running_loop()
        loading = {doc_id: loop.create_future() for doc_id in missing}
        self._loading.update(loading)
        try:
            stored = await self.store.load_many(missing)
            rooms = await asyncio.to_thread(
                lambda: [Room(doc_id, stored.get(doc_id)) for doc_id in missing]
            )
            for room in rooms:
                self._rooms[room.doc_id] = room
                loading[room.doc_id].set_result(room)
        except BaseException as exc:
            for future in loading.values():
                future.set_exception(exc)
                future.exception()  # retrieved: a loader nobody else waits on must not warn
            raise
        finally:
            for doc_id in loading:
                del self._loading[doc_id]

    async def _scope_index(self, room: Room) -> DocIndex | None:
        if room.type is DocType.WORK_ORDER:
            return room.index
        return await self.store.scope_index(room.doc_id)

    async def subscribe(self, peer: Peer, doc_id: str) -> Room:
        """Authorise `peer` to replicate `doc_id` and add it to the room. Raises `Forbidden`. A
        document outside the scope and one that does not exist look alike: to a principal that
        may create such documents, both look absent (an empty document it may write into, which
        creation or the scope then decides); to any other, both are forbidden. A document
        another node owns is subscribed to there (the room returned is this node's proxy)."""
        proxy = self._proxies.get(doc_id)
        if proxy is not None and proxy.owner is not None:
            try:
                await proxy.owner.subscribe(peer, doc_id)
            except OwnerUnavailable:
                # The lease moved, or its node is gone: everyone served through it resyncs.
                self._drop_proxy(proxy, "owner_unreachable")
            else:
                proxy.subscribers[peer] = None
                return proxy
        try:
            room = await self._owned(doc_id)
        except Elsewhere as held:
            return await self._subscribe_elsewhere(peer, held.lease)
        return await self.subscribe_owned(peer, room)

    async def _subscribe_elsewhere(self, peer: Peer, lease: Lease) -> Room:
        """Subscribe `peer` through the node holding `lease`. While that node is unreachable
        (dead, or the lease moved under us), try again until the lease can be claimed here:
        the device's sync waits at most about the lease's lifetime."""
        doc_id = lease.doc
        leases, owners = self.leases, self.owners
        if leases is None or owners is None:
            raise OwnerUnavailable(doc_id)
        deadline = time.monotonic() + 4 * leases.renew_every + 1.0
        while True:
            owner = owners.owner(lease)
            try:
                await owner.subscribe(peer, doc_id)
            except OwnerUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(leases.renew_every / 3)
                try:
                    return await self.subscribe_owned(peer, await self._owned(doc_id))
                except Elsewhere as held:
                    lease = held.lease
                continue
            proxy = self._proxies.get(doc_id)
            if proxy is None or proxy.owner is not owner:
                proxy = self._proxies[doc_id] = Room(doc_id, None)
                proxy.owner = owner
            proxy.subscribers[peer] = None
            return proxy

    async def subscribe_owned(self, peer: Peer, room: Room | str) -> Room:
        """`subscribe` on this node's own room (a document id: loaded, under its lease, or
        `Elsewhere`): what a peer of another node asks of the owner over the link."""
        if isinstance(room, str):
            room = await self._owned(room)
        doc_id = room.doc_id
        if room.exists and in_scope(peer.scope, await self._scope_index(room)):
            self._admit(peer, room)
        elif self.policy.may_create_some(peer.principal, room.type.value):
            room.pending[peer] = None  # sees nothing until the document is in its scope
        else:
            raise Forbidden(doc_id)
        return room

    async def read(self, peer: Peer, room: Room, state_vector: bytes) -> bytes:
        """What a replica at `state_vector` lacks of the document, for a peer that may read it;
        for a waiting peer, what it lacks of an empty document (nothing)."""
        if room.owner is not None:
            return await room.owner.read(peer, room.doc_id, state_vector)
        if await self._may_read(peer, room):
            return room.diff(state_vector)
        return diff(Doc(), state_vector)  # an empty document's, refusing garbage alike

    # Every read and write of a room's content passes one of these two. A waiting peer (see
    # `subscribe`) sees nothing; it is admitted as soon as the document, committed or not,
    # lies in its scope. Any other peer that is not subscribed gets `Forbidden`.

    async def _may_read(self, peer: Peer, room: Room) -> bool:
        """Whether `peer` may see the room's content, to be answered with a diff of it (which
        is all a newly admitted peer then needs)."""
        return peer in room.subscribers or await self._admit_waiting(peer, room)

    async def _may_write(self, peer: Peer, room: Room) -> bool:
        """Whether `peer` writes into content it may see; a newly admitted peer is given the
        whole document first (what it was told before was an empty one)."""
        if peer in room.subscribers:
            return True
        if await self._admit_waiting(peer, room):
            peer.confirmed(room.doc_id, room.ydoc.get_update())
            return True
        return False

    async def _admit_waiting(self, peer: Peer, room: Room) -> bool:
        if peer not in room.pending:
            raise Forbidden(room.doc_id)
        if room.exists and in_scope(peer.scope, await self._live_scope_index(room)):
            room.pending.pop(peer, None)
            self._admit(peer, room)
            return True
        return False

    async def _live_scope_index(self, room: Room) -> DocIndex | None:
        """The scope index of what the room holds now, commits in flight included."""
        if room.type is DocType.WORK_ORDER:
            return room.index
        wo = room.index.wo if room.index is not None else None
        return await self._work_order_index(wo) if wo else None

    def _admit(self, peer: Peer, room: Room) -> None:
        room.subscribers[peer] = None
        present = room.awareness.snapshot()
        if present is not None:
            peer.send_doc(room.doc_id, present)
        self._relay(room, peer, room.awareness.release(peer))  # announced while it waited

    def unsubscribe(self, peer: Peer, room: Room) -> None:
        if room.owner is not None:
            room.subscribers.pop(peer, None)
            room.owner.unsubscribe(peer, room.doc_id)
            if not room.subscribers and self._proxies.get(room.doc_id) is room:
                del self._proxies[room.doc_id]
            return
        room.subscribers.pop(peer, None)
        room.pending.pop(peer, None)
        room.last_used = time.monotonic()
        gone = room.awareness.leave(peer)
        if gone is not None:
            for other in room.subscribers:
                other.send_doc(room.doc_id, gone)

    # --- the write path -----------------------------------------------------------------

    async def submit(self, peer: Peer, room: Room, update: bytes) -> Submitted:
        """Apply a peer's update and queue it for commit. Raises `Forbidden`, `ForbiddenField`,
        `InvalidUpdate` or `DocTooLarge`; nothing of a refused update is kept."""
        if room.owner is not None:
            submitted, room.seq = await room.owner.submit(peer, room.doc_id, update)
            return submitted
        if not await self._may_write(peer, room) and room.exists:
            raise Forbidden(room.doc_id)
        if room.size + len(update) > self.max_doc_bytes:
            raise DocTooLarge(room.doc_id, self.max_doc_bytes)
        check_count(update, "update")  # before any document, previewed or real, decodes it
        if not room.exists:
            try:
                await self._authorise_creation(peer.principal, room, update)
            except Forbidden:
                room.pending.pop(peer, None)
                raise
        created = not room.exists
        # The state vectors around the update are for the author's ack (v1, or over a link).
        acked = _acked(peer)
        before = room.state_vector() if acked else _EMPTY_STATE
        try:
            read = None if created else self._check_write(peer.principal, room, update)
            effective = room.apply(update, read=read)
        except BaseException:
            room.refuse()  # whatever was refused or failed leaves the document as it was
            raise
        finally:
            # The room raises when it is poisoned: drop it here, or its subscribers would go
            # on with a document in memory that storage does not hold (or that panics).
            if room.poisoned:
                self._drop(room, "the document failed to apply an update")
        # Commits happen in apply order, so once this update's commit (or, when it added
        # nothing, the last one in flight) is done, all of this state vector is durable.
        state_vector = room.state_vector() if acked else _EMPTY_STATE
        if effective is None:
            return Submitted(room.tail if room.in_flight else None, state_vector, before)
        touched = room.touched()
        submitted = Submitted(self._commit(room, effective, peer), state_vector, before)
        if peer.origin.kind is OriginKind.RULES:
            return submitted  # a correction the rules made: they never judge their own
        if room.type is DocType.WORK_ORDER:
            await self._enforce_rules(room, peer, touched, created)
        else:
            self._judge_form(room)
            self._spawn(self._recheck_work_order(room, peer, submitted.committed))
        return submitted

    def _check_write(
        self, principal: Principal, room: Room, update: bytes
    ) -> list[FieldChange] | None:
        """Read what `update` writes as the room's document takes it, tentatively (`Room.written`),
        for a writer held to paths or to a scope, and for a document with roots fixed at
        creation; raise `ForbiddenField` for what may not be written, and for a write that
        would leave the document outside the writer's scope (the check of creation, after
        every update). Returns what it read, None when there was nothing to check."""
        everything = self.policy.writes_everything(principal, room.type.value)
        frozen = documents.frozen_roots(room.type)
        held = self.policy.held_to(principal) if room.type is DocType.WORK_ORDER else {}
        if everything and not frozen and not held:
            return None
        changes = room.written(update)
        paths = {change.path for change in changes}
        refused = (
            [] if everything else self.policy.forbidden_paths(principal, room.type.value, paths)
        )
        fixed = sorted(path for path in paths if path.split(".", 1)[0] in frozen)
        forged = (
            [] if everything else rules.log_problems(changes, principal.subject, principal.roles)
        )
        root = documents.index_root(room.type)
        keys = {path.split(".")[1] for path in paths if path.startswith(root + ".")}
        # The index is read only when the write touches a key the writer is held to: the
        # others cannot move the document out of its scope.
        moved = (
            self.policy.outside(principal, room.tentative_index(), keys)
            if not keys.isdisjoint(held)
            else []
        )
        if refused or fixed or forged or moved:
            room.refuse()
            if refused:
                raise ForbiddenField(room.doc_id, refused)
            if fixed:
                roots = ", ".join(sorted(frozen))
                why = f"{roots} is written when the document is created, never after"
                raise ForbiddenField(room.doc_id, fixed, why)
            if moved:
                why = "the write would leave the document outside your scope: " + ", ".join(
                    f"{root}.{key} must stay {held[key]!r}" for key in moved
                )
                raise ForbiddenField(room.doc_id, [f"{root}.{key}" for key in moved], why)
            raise ForbiddenField(
                room.doc_id,
                sorted({path for path, _ in forged}),
                "; ".join(problem for _, problem in forged),
            )
        return changes

    def _judge_form(self, room: Room) -> None:
        """Mark wrong, out-of-range and missing answers in the form's `validation` map, for the
        app to show and for completion to wait on; nothing a device answered is dropped."""
        corrections = self.rules.form(room.ydoc)
        if not corrections:
            return

        def correct(doc: Doc[Any]) -> None:
            for correction in corrections:
                correction.fix(doc)

        written = room.write(correct)
        if written is not None:
            self._commit(room, written, None, actor="server", origin=RULES_ORIGIN)

    async def _enforce_rules(
        self, room: Room, author: Peer, touched: frozenset[str] | None, created: bool = False
    ) -> None:
        """Correct what the merged state may not keep, as the server's own update, committed
        after the author's and broadcast to every replica (the author included); tell the
        author what was corrected and why, and keep a conflict record of it."""
        principal = author.principal
        role = self.policy.acting_role(principal) if created else None
        creator = rules.Creator(principal.subject, role) if role else None
        forms: dict[str, list[str]] = {}
        if self.rules.forms_needed(touched, room.read):
            forms = await self._forms_blocking(room.doc_id)
        corrections = self.rules.work_order(
            room.ydoc,
            self.policy.may_move,
            forms,
            touched=touched,
            creator=creator,
            read=room.read,
        )
        if not corrections:
            return

        def correct(doc: Doc[Any]) -> None:
            for correction in corrections:
                correction.fix(doc)

        written = room.write(correct)
        if written is not None:
            self._commit(room, written, None, actor="server", origin=RULES_ORIGIN)
        index = room.index
        for violation in (v for correction in corrections for v in correction.violations):
            author.rule_violation(room.doc_id, violation.rule, violation.detail)
            self.observer.corrected(violation.rule)
            self.store.record_conflict(
                Conflict(
                    doc=room.doc_id,
                    rule=violation.rule,
                    detail=violation.detail,
                    actor=principal.subject,
                    origin=author.origin,
                    team=index.team if index else None,
                    region=index.region if index else None,
                    assignee=index.assignee if index else None,
                ),
                fence=room.fence,
            )

    async def _recheck_work_order(
        self, form: Room, author: Peer, committed: asyncio.Future[Committed] | None
    ) -> None:
        """A form's answers decide whether its work order's completion stands: judge the work
        order again when one of its forms changes, so the outcome does not depend on which of
        the two documents' updates arrived first. After the form's commit: a new form is only
        listed with its work order once stored."""
        if committed is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(committed)
        wo_id = form.index.wo if form.index is not None else None
        if not wo_id:
            return
        await self.recheck(wo_id, author)

    async def recheck(self, wo_id: str, author: Peer) -> None:
        """Judge the work order again after a change of one of its forms, on the node that
        owns it (so its rules run once, there)."""
        try:
            room = await self._owned(wo_id)
        except Elsewhere as held:
            if self.owners is not None:
                await self.owners.owner(held.lease).recheck(wo_id, author)
            return
        if room.exists and not room.poisoned:
            await self._enforce_rules(room, author, frozenset({rules.FORMS}))

    async def _forms_blocking(self, wo_id: str) -> dict[str, list[str]]:
        """Per form of the work order, what keeps it from completion: answers of the wrong
        type, out of range, or required and missing, against the form's own template version.
        A withdrawn form blocks nothing."""
        blocking = {}
        for form_id in await self.store.forms(wo_id):
            form = await self.room(form_id)
            problems = self.rules.form_blocks(form.ydoc)
            if problems:
                blocking[form_id] = problems
        return blocking

    async def durable_state_vector(self, peer: Peer, room: Room) -> bytes:
        """The room's state vector, returned once all it covers is committed: a device may
        forget its queued edits that this state vector covers. A waiting peer, and one reset
        meanwhile because a commit failed, get an empty document's."""
        if room.owner is not None:
            return await room.owner.durable_state_vector(peer, room.doc_id)
        if peer not in room.subscribers:
            return _EMPTY_STATE
        state_vector = room.state_vector()
        tail = room.tail
        if room.in_flight and tail is not None and not tail.done():
            await asyncio.wait([tail])
            if peer not in room.subscribers:
                # A commit failed (the room was dropped, the peer reset) or the peer left: what
                # the state vector covers may never be stored, and a device takes it as acks.
                return _EMPTY_STATE
        return state_vector

    async def _authorise_creation(self, principal: Principal, room: Room, update: bytes) -> None:
        """The one creation check of every path (v1, y-websocket, REST): the policy's creation
        rights in the scope the new document would lie in, then the documents' creation rule
        (`documents.creation_problems`). Raises `Forbidden`, `ForbiddenField` or
        `InvalidUpdate`; nothing of the update reaches the room."""
        new = preview(update)
        index = documents.index(room.doc_id, new)
        if room.type is DocType.WORK_ORDER:
            scope_index: DocIndex | None = index
        else:
            scope_index = await self._work_order_index(index.wo) if index.wo else None
        if not self.policy.may_create(principal, room.type.value, scope_index):
            raise Forbidden(room.doc_id)
        problems = documents.creation_problems(room.type, new, self.templates)
        if problems:
            why = "; ".join(dict.fromkeys(problems.values()))
            raise ForbiddenField(room.doc_id, sorted(problems), why)

    async def create(
        self, doc_id: str, update: bytes, principal: Principal, origin: Origin
    ) -> Committed:
        """Bring a document the server built into existence on behalf of `principal` (a REST
        creation): the creation rights a device's first update is held to, then the same commit
        and fan-out. Returns once it is durable. Raises `AlreadyExists`, `Forbidden`,
        `ForbiddenField`, `DocTooLarge` or `InvalidUpdate`."""
        if len(update) > self.max_doc_bytes:
            raise DocTooLarge(doc_id, self.max_doc_bytes)
        check_count(update, "update")
        try:
            room = await self._owned(doc_id)
        except Elsewhere as held:
            if self.owners is None:
                raise OwnerUnavailable(doc_id) from None
            return await self.owners.owner(held.lease).create(doc_id, update, principal, origin)
        if room.exists:
            raise AlreadyExists(doc_id)
        await self._authorise_creation(principal, room, update)
        # Looked up again: while the policy check waited, the room may have been evicted or a
        # device may have created the document. From here on nothing waits until the commit.
        room = await self._owned(doc_id)
        if room.exists:
            raise AlreadyExists(doc_id)
        try:
            effective = room.apply(update)
        finally:
            if room.poisoned:
                self._drop(room, "the document failed to apply an update")
        if effective is None:
            raise InvalidUpdate(f"{doc_id}: the update creates nothing")
        return await self._commit(room, effective, None, principal.subject, origin)

    async def _work_order_index(self, wo_id: str) -> DocIndex | None:
        # A work order applied but not yet committed is only in memory: a device back from
        # offline sends a new work order and its new form in the same batch.
        room = self._rooms.get(wo_id)
        if room is not None and room.exists and not room.poisoned:
            return room.index
        return await self.store.scope_index(wo_id)

    def _commit(
        self,
        room: Room,
        effective: bytes,
        author: Peer | None,
        actor: str | None = None,
        origin: Origin | None = None,
    ) -> asyncio.Future[Committed]:
        before = room.index
        index = room.reindex()
        moves = _moves_scope(before, index)
        relayed = author is not None and not (moves or self._moving or room.held)
        write = Write(
            doc=room.doc_id,
            data=effective,
            origin=origin or (author.origin if author else RULES_ORIGIN),
            actor=actor or (author.principal.subject if author else "server"),
            index=index,
            history=room.take_changes(),
            fence=room.fence,
            awaited=not relayed or author is None or _acked(author),
        )
        room.in_flight += 1
        committed = asyncio.ensure_future(self.store.append(write))
        room.tail = committed
        # A peer's update goes to the other replicas now, before it is durable: their fan-out
        # must not wait for an fsync that has nothing to do with them (S1: stalls of 28-150 ms
        # on a shared disk; Hocuspocus and y-websocket relay first too). Only the durable
        # promises wait for the commit: the author's ack, `durable_state_vector`, the change
        # feed and the live views (`_on_commit`). A commit that fails drops the room and resets
        # every peer: a replica that got the update drops it with its copy and applies again
        # only its own edits, which no ack covered (both clients). A step 2 served to a syncing
        # peer shows uncommitted updates already; a live update is no different.
        # Fanned out after their commit, as before, with the writes after them in their room:
        # - the server's own writes (rule corrections, REST creations): what a replica is told
        #   the server decided is what it holds;
        # - a write that creates the document or moves it between scopes, with every room's
        #   writes while it is in flight: a peer it moves out is unsubscribed (`_rescope`, on
        #   the commit) before it could be sent the move, a later update, or a form of it.
        if relayed:
            self._fan_out(room, effective, author)
        else:
            room.held += 1
            self._moving += moves
        committed.add_done_callback(
            lambda f: self._on_commit(room, effective, author, relayed, moves, f)
        )
        return committed

    def _on_commit(
        self,
        room: Room,
        effective: bytes,
        author: Peer | None,
        relayed: bool,
        moves: bool,
        done: asyncio.Future[Committed],
    ) -> None:
        room.in_flight -= 1
        if not relayed:
            room.held -= 1
            self._moving -= moves
        if done.cancelled() or done.exception() is not None:
            if isinstance(done.exception(), LeaseLost):
                # Another node owns the document now: nothing more of this room is stored,
                # and its peers resync through the new owner.
                log.warning("%s: lease lost, the room is dropped", room.doc_id)
                if self.leases is not None:
                    self._spawn(self.leases.release([room.doc_id]))
                self._drop(room, "lease_lost")
                return
            log.error("commit of %s failed: %r", room.doc_id, done.exception())
            self._drop(room, "storage failure: the last update was not stored")
            return
        committed = done.result()
        created = room.seq == 0
        room.seq = committed.seq
        if committed.scope_change is not None:
            self.rescope(committed.scope_change)
        if created and room.pending:
            self._spawn(self._settle_pending(room))
        if not relayed:
            self._fan_out(room, effective, author)
        for hook in self.commit_hooks:
            hook(room, committed)

    def _fan_out(self, room: Room, effective: bytes, author: Peer | None) -> None:
        """Send an update to every subscriber but its author, encoded once for all."""
        message = encode_sync(SyncStep.UPDATE, effective)
        for peer in room.subscribers:
            if peer is not author:
                peer.send_doc(room.doc_id, message)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own, kept until done (or until `stop`); a failure is logged."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed: %r", task.exception())

    async def _settle_pending(self, room: Room) -> None:
        """The document now exists: admit the peers waiting for it that it is for. The others
        go on waiting and seeing nothing, as they would for a document that does not exist."""
        scope_index = await self._scope_index(room)
        for peer in list(room.pending):
            if in_scope(peer.scope, scope_index):
                del room.pending[peer]
                self._admit(peer, room)
                # The whole state, the author's too: updates of other waiting peers committed
                # before this ran reached no one.
                peer.confirmed(room.doc_id, room.ydoc.get_update())

    def _subscribed(self, doc_id: str) -> Room | None:
        """The room peers of this node replicate `doc_id` through: its own, or a proxy of the
        owner's (whose subscription there an unsubscribe ends too)."""
        return self._rooms.get(doc_id) or self._proxies.get(doc_id)

    def rescope(self, change: ScopeChange) -> None:
        """A work order was created or moved to another scope (here, or on another node: the
        feed follower): the peers it leaves are unsubscribed and told, those it reaches told."""
        docs = (change.doc, *change.forms)
        for peer in list(self.peers):
            was = in_scope(peer.scope, change.before)
            now = in_scope(peer.scope, change.after)
            if was and not now:
                for doc_id in docs:
                    room = self._subscribed(doc_id)
                    if room is not None:
                        self.unsubscribe(peer, room)
                peer.scope_removed(docs)
            elif now and not was:
                peer.scope_added(docs)

    async def reprincipal(self, peer: Peer, principal: Principal) -> None:
        """`peer` now acts as `principal` (the directory moved them to another team or region):
        what its new scope hides is removed and what it shows is added, as for a reassignment."""
        before, after = peer.scope, self.policy.scope(principal)
        peer.principal, peer.scope = principal, after  # nothing more under the old scope
        if before == after:
            return
        old, new = await self._scope_docs(before), await self._scope_docs(after)
        removed = [doc_id for doc_id in old if doc_id not in new]
        for doc_id in removed:
            room = self._subscribed(doc_id)
            if room is not None:
                self.unsubscribe(peer, room)
        if removed:
            peer.scope_removed(removed)
        added = [doc_id for doc_id in new if doc_id not in old]
        if added:
            peer.scope_added(added)

    async def _scope_docs(self, scope: ScopeFilter) -> dict[str, None]:
        """Every document in `scope`, in change order."""
        docs: dict[str, None] = {}
        since = 0
        while True:
            page = await self.store.changes(scope, since, 1000)
            docs.update((doc.id, None) for doc in page.docs)
            if not page.more:
                return docs
            since = page.upto

    def _drop(self, room: Room, reason: str) -> None:
        """Forget a room whose memory can no longer be trusted; its peers resync from storage."""
        if self._rooms.get(room.doc_id) is room:
            del self._rooms[room.doc_id]
        for peer in list(room.subscribers) + list(room.pending):
            peer.reset(room.doc_id, reason)
        room.subscribers.clear()
        room.pending.clear()

    # --- awareness ----------------------------------------------------------------------

    def relay_awareness(self, peer: Peer, room: Room, payload: bytes) -> None:
        """Awareness (cursors, presence) goes to the other replicas and is never stored. A
        replica changes only the client ids it announced first (`Awareness`). A peer still
        waiting for the document (see `subscribe`) is held to be heard once it is admitted:
        every Yjs provider announces itself on connecting, before any document exists."""
        if room.owner is not None:
            room.owner.relay_awareness(peer, room.doc_id, payload)
        elif peer in room.pending:
            room.awareness.hold(peer, payload)
        elif peer in room.subscribers:
            self._relay(room, peer, room.awareness.apply(peer, payload))
        else:
            raise Forbidden(room.doc_id)

    def _relay(self, room: Room, sender: Peer, message: bytes | None) -> None:
        if message is not None:
            for other in room.subscribers:
                if other is not sender:
                    other.send_doc(room.doc_id, message)

    def leave(self, peer: Peer, rooms: Iterable[Room]) -> None:
        for room in rooms:
            self.unsubscribe(peer, room)
        self.peers.pop(peer, None)

    # --- memory -------------------------------------------------------------------------

    async def _evict_idle(self) -> None:
        self.evict()

    def evict(self) -> int:
        """Drop rooms nobody replicates that have been idle long enough, and the least recently
        used idle rooms beyond `max_rooms`. Returns how many were dropped."""
        now = time.monotonic()
        idle = sorted(
            (room for room in self._rooms.values() if room.idle), key=lambda r: r.last_used
        )
        excess = len(self._rooms) - self.max_rooms
        dropped = []
        for room in idle:
            if excess > 0 or now - room.last_used >= self.idle_seconds:
                del self._rooms[room.doc_id]
                excess -= 1
                dropped.append(room.doc_id)
        if dropped and self.leases is not None:
            # Given up now (the next load claims anew), stored as expired in the background.
            self._spawn(self.leases.release(dropped))
        return len(dropped)

    # --- cluster ------------------------------------------------------------------------

    async def _renew(self) -> None:
        if self.leases is None:
            return
        for doc_id in await self.leases.renew():
            room = self._rooms.get(doc_id)
            if room is not None:
                log.warning("%s: lease lost, the room is dropped", doc_id)
                self._drop(room, "lease_lost")

    def owner_lost(self, owner: Owner, reason: str = "owner_unreachable") -> None:
        """The link to `owner` broke: every peer served through it resyncs (the next
        subscribe finds the document's owner anew, or claims it once its lease expired)."""
        for proxy in list(self._proxies.values()):
            if proxy.owner is owner:
                self._drop_proxy(proxy, reason)

    def _drop_proxy(self, proxy: Room, reason: str) -> None:
        if self._proxies.get(proxy.doc_id) is proxy:
            del self._proxies[proxy.doc_id]
        for peer in list(proxy.subscribers):
            peer.reset(proxy.doc_id, reason)
        proxy.subscribers.clear()

    def proxied_scope_removed(self, peer: Peer, doc_ids: Iterable[str]) -> None:
        """The owner unsubscribed `peer` from these documents (they left its scope)."""
        for doc_id in doc_ids:
            proxy = self._proxies.get(doc_id)
            if proxy is not None:
                proxy.subscribers.pop(peer, None)
                if not proxy.subscribers:
                    del self._proxies[doc_id]


def _acked(peer: Peer) -> bool:
    """Whether `peer` is told when its writes are durable: a plain y-websocket client never is
    (nothing waits for its commits; no state vectors are kept for its acks)."""
    return peer.origin.kind is not OriginKind.YWS


def _moves_scope(before: DocIndex | None, after: DocIndex | None) -> bool:
    """Whether a write whose new index is `after` (None: unchanged) creates the document or
    moves it between scopes: the storage reports a `ScopeChange` for such a commit."""
    if after is None:
        return False
    return before is None or (before.assignee, before.team, before.region) != (
        after.assignee,
        after.team,
        after.region,
    )


__all__ = [
    "AlreadyExists",
    "DocTooLarge",
    "Elsewhere",
    "Forbidden",
    "ForbiddenField",
    "InvalidUpdate",
    "Owner",
    "OwnerUnavailable",
    "Owners",
    "Replicator",
    "Submitted",
]
