"""What the replicator needs of a connected replica, whatever protocol it speaks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fieldsync.auth import Principal
from fieldsync.records import Origin, ScopeFilter


class Peer(Protocol):
    principal: Principal
    scope: ScopeFilter
    origin: Origin  # recorded with every update this peer writes: a device, a yws session

    def send_doc(self, doc_id: str, message: bytes) -> None:
        """Queue one y-protocols message about `doc_id`; never suspends."""
        ...

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        """A document this peer asked for before it existed now exists in its scope; `update`
        is its state when this peer did not write it."""
        ...

    def scope_added(self, doc_ids: Sequence[str]) -> None: ...

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        """These documents left the peer's scope; the replicator has unsubscribed it already."""
        ...

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        """The server corrected what this peer's update left in breach of a domain rule."""
        ...

    def reset(self, doc_id: str, reason: str) -> None:
        """The peer must drop its copy of `doc_id` and sync it again."""
        ...
