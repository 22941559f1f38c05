"""The write path's face for inbound adapters (`fieldsync.adapters.DocumentWriter`).

An adapter never writes tables behind the write path (DESIGN.md §7): it edits a document the way
a device does. Its change is made on a copy of the document as it is now, and the update that
makes is submitted as a peer with no socket, the adapter's service principal (subject
`adapter:<name>`, role `service`, whose rights the policy declares): authorise, apply, rules,
commit and fan-out run as for any device, and the field history names the adapter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, merge_updates

from fieldsync.auth import Principal, Role
from fieldsync.records import Origin, ScopeFilter
from fieldsync.replication._replicator import Replicator

__all__ = ["SERVICE_ROLE", "Edited", "ServiceWriter", "edit_as", "service_principal"]

log = logging.getLogger(__name__)

_EVERYTHING = b"\x00"  # the state vector of an empty document: read it all

# The role an adapter's log entries (`status_log`, `meter_readings`) name beside its subject
# `adapter:<name>`: the write path accepts entries in the writer's own name and role only.
SERVICE_ROLE: str = Role.SERVICE.value


def service_principal(origin: Origin) -> Principal:
    """The principal an adapter writes as: named after its origin (`adapter:erp`), in the
    policy's `service` role. No token maps to this role (`ClaimMapping`): only code running in
    the server writes as a service."""
    return Principal(subject=str(origin), roles=frozenset({Role.SERVICE}))


class _ServicePeer:
    """A `Peer` without a socket: it holds the principal and origin of one edit and hears
    nothing back but the rules' verdicts on it."""

    def __init__(self, principal: Principal, scope: ScopeFilter, origin: Origin) -> None:
        self.principal = principal
        self.scope = scope
        self.origin = origin
        self.violations: list[tuple[str, str]] = []  # (rule, detail)

    def send_doc(self, doc_id: str, message: bytes) -> None:
        pass  # an adapter reads the document when it needs it; nothing is pushed to it

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        pass

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        pass

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        pass

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        # The replicator records the conflict; the log says who caused it.
        log.warning("%s: the rules corrected %s (%s): %s", doc_id, self.origin, rule, detail)
        self.violations.append((rule, detail))

    def reset(self, doc_id: str, reason: str) -> None:
        pass  # the edit in hand fails with its commit; the next one starts from storage


@dataclass(frozen=True, slots=True)
class Edited:
    """An edit's outcome: its change seq once durable (None: it changed nothing), and what the
    rules corrected of it, as (rule, detail)."""

    seq: int | None
    violations: tuple[tuple[str, str], ...] = ()


async def edit_as(
    replicator: Replicator,
    principal: Principal,
    origin: Origin,
    doc_id: str,
    change: Callable[[Doc[Any]], None],
) -> Edited:
    """Apply `change` to a copy of the document as it is now, as `principal` (a peer with no
    socket), and submit what it changed through the write path; return once it is durable.
    Raises what a device's update would meet (`Forbidden`, `ForbiddenField`, `InvalidUpdate`,
    `DocTooLarge`)."""
    peer = _ServicePeer(principal, replicator.policy.scope(principal), origin)
    room = await replicator.subscribe(peer, doc_id)
    try:
        # A fresh copy, with a client id of its own: the room's client id is the server's (its
        # rules' corrections), and two edits in flight must never share one.
        copy: Doc[Any] = Doc()
        # Read through the write path, so a document another node owns is read there.
        copy.apply_update(await replicator.read(peer, room, _EVERYTHING))
        made: list[bytes] = []
        copy.observe(lambda event: made.append(event.update))
        with copy.transaction(origin=peer.origin):
            change(copy)
        if not made:
            return Edited(None)
        update = made[0] if len(made) == 1 else merge_updates(*made)
        submitted = await replicator.submit(peer, room, update)
        if submitted.committed is None:
            return Edited(None, tuple(peer.violations))
        # Shielded: a caller stopped mid-edit must not cancel the store's commit future (the
        # replicator would take that for a failed commit and reset the room).
        committed = await asyncio.shield(submitted.committed)
        return Edited(committed.seq, tuple(peer.violations))
    finally:
        replicator.unsubscribe(peer, room)


class ServiceWriter:
    """The `DocumentWriter` inbound adapters are given: edits and reads of documents through the
    replicator, each edit as the service principal of its origin."""

    def __init__(self, replicator: Replicator) -> None:
        self._replicator = replicator

    async def edit(
        self, doc_id: str, change: Callable[[Doc[Any]], None], origin: Origin
    ) -> int | None:
        """Apply `change` to a copy of the document as it is now (empty when it does not exist:
        the edit then creates it, if the policy lets the service role create it) and submit
        what it changed; return the change seq once durable, None when it changed nothing.
        Raises what a device's update would meet (`Forbidden`, `ForbiddenField`,
        `InvalidUpdate`, `DocTooLarge`); what the rules correct is corrected and logged."""
        edited = await edit_as(self._replicator, service_principal(origin), origin, doc_id, change)
        return edited.seq

    async def read(self, doc_id: str) -> Mapping[str, Any] | None:
        """The document's JSON projection as the room holds it now, None when it does not
        exist. The service role sees every document (`scope = "all"` in the policy)."""
        room = await self._replicator.room(doc_id)
        return room.to_json() if room.exists else None
