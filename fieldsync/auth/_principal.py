"""Who is asking (a principal from a verified token) and which documents that principal sees."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fieldsync.storage import DocIndex, ScopeFilter, ScopeKind


class Role(StrEnum):
    TECHNICIAN = "technician"
    SUPERVISOR = "supervisor"
    MANAGER = "manager"  # regional manager
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    roles: frozenset[Role]
    team: str | None = None
    region: str | None = None
    name: str | None = None
    expires_at: float | None = None  # epoch seconds of the token's `exp`


def scope_of(principal: Principal) -> ScopeFilter:
    """The widest scope among the principal's roles: admin > manager > supervisor > technician."""
    roles = principal.roles
    if Role.ADMIN in roles:
        return ScopeFilter(ScopeKind.ALL)
    if Role.MANAGER in roles and principal.region:
        return ScopeFilter(ScopeKind.REGION, principal.region)
    if Role.SUPERVISOR in roles and principal.team:
        return ScopeFilter(ScopeKind.TEAM, principal.team)
    if Role.TECHNICIAN in roles:
        return ScopeFilter(ScopeKind.ASSIGNEE, principal.subject)
    return ScopeFilter(ScopeKind.NONE)


def in_scope(scope: ScopeFilter, index: DocIndex | None) -> bool:
    """Whether a document whose scope index (a work order's row; see `Store.scope_index`) is
    `index` lies inside `scope`. An absent document is in no scope but `all`'s."""
    if scope.kind is ScopeKind.ALL:
        return True
    if index is None or scope.kind is ScopeKind.NONE:
        return False
    value = {
        ScopeKind.ASSIGNEE: index.assignee,
        ScopeKind.TEAM: index.team,
        ScopeKind.REGION: index.region,
    }[scope.kind]
    return value is not None and value == scope.value


def may_create(principal: Principal, doc_type: str, scope_index: DocIndex | None) -> bool:
    """Whether `principal` may bring a new document into existence. For a work order
    `scope_index` is the new document's own index; for a form it is its work order's (forms are
    created by whoever sees that work order)."""
    scope = scope_of(principal)
    if doc_type == "wo":
        creators = {Role.SUPERVISOR, Role.MANAGER, Role.ADMIN}
        return bool(principal.roles & creators) and in_scope(scope, scope_index)
    if doc_type == "form":
        # A form belongs to a work order that exists, whoever creates it.
        return scope_index is not None and in_scope(scope, scope_index)
    return False
