"""The records several layers share: scopes, the index projection of a document, a field's
change, and where a change came from. Everything may import this module; it imports nothing of
fieldsync (DESIGN.md §1: the vocabulary at the bottom)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


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
    # What the screens show without loading the document (issue 5).
    site: str | None = None
    asset_id: str | None = None


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field's change in an update: "fields.status", "checklist.2.done", or a root text or
    array ("notes") whose `new` is the change's delta."""

    path: str
    old: Any
    new: Any


class OriginKind(StrEnum):
    """Who made a change: a device over `fieldsync.v1`, a plain y-websocket client, a REST call,
    the server's domain rules, or an adapter (ERP, directory, plant floor)."""

    DEVICE = "device"
    YWS = "yws"
    REST = "rest"
    RULES = "rules"
    ADAPTER = "adapter"


@dataclass(frozen=True, slots=True)
class Origin:
    """The origin of a change: its kind and, where there are several, which one (a device id, a
    y-websocket session, an adapter's name). Stored as text, `kind:id` (`kind` alone without an
    id), and recorded with every update and field change, so that rules never react to their
    own corrections and an adapter is never sent back what it wrote."""

    kind: OriginKind
    id: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}" if self.id else self.kind.value

    @classmethod
    def parse(cls, text: str) -> Origin:
        """The origin stored as `text`, also in the untyped forms databases written before
        origins were typed still hold; raises ValueError for an unknown kind."""
        kind, _, ident = text.partition(":")
        legacy = _LEGACY.get(kind)
        if legacy is not None:
            return cls(legacy) if legacy is OriginKind.RULES else cls(legacy, ident)
        return cls(OriginKind(kind), ident)


# Read, never written: "server" and "server:rules" were the rules' corrections; "session:<id>" a
# connection's origin until its `hello` named the device (whose id then defaulted to the session
# id). Old rows are kept as they are: the field history and the conflicts are an audit trail.
_LEGACY = {"server": OriginKind.RULES, "session": OriginKind.DEVICE}


@dataclass(frozen=True, slots=True)
class Person:
    """One person of the organisation's directory, as the directory sync keeps them: `subject`
    is the value a token's `sub` carries for them; `enabled` false for one disabled, or deleted
    since (kept, so that their tokens are refused until they expire)."""

    subject: str
    name: str | None = None
    mail: str | None = None
    team: str | None = None
    region: str | None = None
    supervisor: str | None = None  # the supervisor's subject
    enabled: bool = True


class Observer(Protocol):
    """What the write path reports as it goes, for the operators' metrics: the few figures that
    exist nowhere as state. Calls may come from the storage writer's thread."""

    def committed(self, writes: int, seconds: float) -> None:
        """A group commit of `writes` jobs took `seconds` (BEGIN to COMMIT, fsync included)."""

    def acknowledged(self, seconds: float) -> None:
        """A device's update was durable `seconds` after the server received it."""

    def refused(self, code: str) -> None:
        """A device's update or request on one document was refused with the error `code`."""

    def corrected(self, rule: str) -> None:
        """A domain rule corrected a merged document."""


class _Unobserved:
    def committed(self, writes: int, seconds: float) -> None:
        pass

    def acknowledged(self, seconds: float) -> None:
        pass

    def refused(self, code: str) -> None:
        pass

    def corrected(self, rule: str) -> None:
        pass


UNOBSERVED: Observer = _Unobserved()
