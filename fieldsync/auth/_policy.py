"""The access policy: per role, which documents it sees, which it creates, which paths of a
document it writes. Loaded from TOML, validated at start; every decision is made here."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fieldsync.auth._principal import Principal, Role
from fieldsync.records import DocIndex, ScopeFilter, ScopeKind

DOC_TYPES = ("wo", "form")
# Wider first: a principal with several roles sees through its widest.
_SCOPES = {
    "all": ScopeKind.ALL,
    "region": ScopeKind.REGION,
    "team": ScopeKind.TEAM,
    "assigned": ScopeKind.ASSIGNEE,
}


class PolicyError(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"policy: {where}: {message}")


@dataclass(frozen=True, slots=True)
class Grant:
    scope: ScopeKind
    create: frozenset[str]
    write: Mapping[str, tuple[str, ...]]
    datasets: frozenset[str]
    transitions: frozenset[str] = frozenset()  # "from>to", or "*" for all


# A write pattern: "*" alone, or dot-separated segments, each a name or "*" (any one key of a
# map, any one item of an array): "checklist", "fields.*", "checklist.*.done".
_SEGMENT = re.compile(r"\*|[A-Za-z0-9_-]+")


def path_allowed(path: str, patterns: Iterable[str]) -> bool:
    """Whether a pattern covers `path`: the path it names, and everything below it ("*" alone
    is any root, so everything)."""
    steps = path.split(".")
    return any(_covers(pattern.split("."), steps) for pattern in patterns)


def _covers(parts: list[str], steps: list[str]) -> bool:
    return len(parts) <= len(steps) and all(
        part in ("*", step) for part, step in zip(parts, steps, strict=False)
    )


class Policy:
    def __init__(self, grants: Mapping[Role, Grant], source: str) -> None:
        self.grants = dict(grants)
        self.source = source
        self._by_name = {role.value: grant for role, grant in self.grants.items()}
        # Per set of roles (few: the policy's roles combined), asked on every write.
        self._of_roles: dict[frozenset[Role], tuple[Grant, ...]] = {}
        self._everything: dict[tuple[frozenset[Role], str], bool] = {}

    @classmethod
    def load(cls, path: Path | None = None) -> Policy:
        """The policy in `path`, or the shipped one; raises `PolicyError` naming what is wrong."""
        if path is None:
            text = resources.files("fieldsync.auth").joinpath("policy.toml").read_text()
            source = "shipped policy.toml"
        else:
            try:
                text = path.read_text()
            except OSError as exc:
                raise PolicyError(str(path), exc.strerror or str(exc)) from None
            source = str(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(source, str(exc)) from None
        return cls(_grants(data, source), source)

    def _grants(self, principal: Principal) -> tuple[Grant, ...]:
        grants = self._of_roles.get(principal.roles)
        if grants is None:
            grants = tuple(self.grants[role] for role in principal.roles if role in self.grants)
            self._of_roles[principal.roles] = grants
        return grants

    def scope(self, principal: Principal) -> ScopeFilter:
        kinds = {grant.scope for grant in self._grants(principal)}
        for kind in _SCOPES.values():
            if kind in kinds:
                value = {
                    ScopeKind.ALL: None,
                    ScopeKind.REGION: principal.region,
                    ScopeKind.TEAM: principal.team,
                    ScopeKind.ASSIGNEE: principal.subject,
                }[kind]
                if kind is ScopeKind.ALL or value:
                    return ScopeFilter(kind, value)
        return ScopeFilter(ScopeKind.NONE)

    def may_create(self, principal: Principal, doc_type: str, scope_index: DocIndex | None) -> bool:
        """Whether `principal` may create a document of `doc_type` whose scope index (its own
        for a work order, its work order's for a form, which must exist) is `scope_index`. A
        work order is born inside everything its creator is held to (`outside`)."""
        if not any(doc_type in grant.create for grant in self._grants(principal)):
            return False
        if doc_type == "form" and scope_index is None:
            return False
        if doc_type == "wo" and scope_index is not None and self.outside(principal, scope_index):
            return False
        return in_scope(self.scope(principal), scope_index)

    def held_to(self, principal: Principal) -> dict[str, str]:
        """The scope keys of a work order (`DocIndex` attributes) whose values a write by
        `principal` must leave as its own, so that no write takes a document out of its scope:
        the assignee for a role that sees its own work, the team (and its region: a team lies
        in one) for a team's, the region for a region's, nothing for one that sees all."""
        scope = self.scope(principal)
        if scope.kind is ScopeKind.ASSIGNEE:
            return {"assignee": principal.subject}
        if scope.kind is ScopeKind.TEAM and principal.team:
            return {"team": principal.team} | (
                {"region": principal.region} if principal.region else {}
            )
        if scope.kind is ScopeKind.REGION and principal.region:
            return {"region": principal.region}
        return {}

    def outside(
        self, principal: Principal, index: DocIndex, keys: Iterable[str] | None = None
    ) -> list[str]:
        """Of the scope keys `principal` is held to (those among `keys`, None: all), those
        whose value in `index` is not its own, sorted."""
        held = self.held_to(principal)
        wanted = held if keys is None else set(keys) & set(held)
        return sorted(key for key in wanted if getattr(index, key) != held[key])

    def may_create_some(self, principal: Principal, doc_type: str) -> bool:
        """Whether `principal` could create a `doc_type` anywhere in its scope."""
        return any(doc_type in grant.create for grant in self._grants(principal))

    def writes_everything(self, principal: Principal, doc_type: str) -> bool:
        key = (principal.roles, doc_type)
        everything = self._everything.get(key)
        if everything is None:
            grants = self._grants(principal)
            everything = any("*" in grant.write.get(doc_type, ()) for grant in grants)
            self._everything[key] = everything
        return everything

    def forbidden_paths(
        self, principal: Principal, doc_type: str, paths: Iterable[str]
    ) -> list[str]:
        allowed = [p for grant in self._grants(principal) for p in grant.write.get(doc_type, ())]
        return sorted(path for path in set(paths) if not path_allowed(path, allowed))

    def may_move(self, role: str, before: str | None, after: str) -> bool:
        """Whether `role` may move a work order's status from `before` to `after`, or create
        one in `after` (before None). The status machine itself is the rules' business (see
        `documents.work_order_rules`); a role this policy does not know may do nothing."""
        grant = self._by_name.get(role)
        if grant is None:
            return False
        if before is None:
            return "wo" in grant.create
        return "*" in grant.transitions or f"{before}>{after}" in grant.transitions

    def acting_role(self, principal: Principal) -> str | None:
        """The role a status change by `principal` is logged under when its device names none
        (a creation by a stock Yjs client, a REST call): of its roles, the widest."""
        for role in reversed(Role):
            if role in principal.roles and role in self.grants:
                return role.value
        return None

    def datasets(self, principal: Principal) -> frozenset[str]:
        return frozenset().union(*(grant.datasets for grant in self._grants(principal)))


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


def _grants(data: Mapping[str, Any], source: str) -> dict[Role, Grant]:
    unknown = set(data) - {"roles"}
    if unknown:
        raise PolicyError(source, f"unknown top-level keys {sorted(unknown)}")
    roles = data.get("roles")
    if not isinstance(roles, dict) or not roles:
        raise PolicyError(source, "no [roles.<name>] tables")
    grants = {}
    for name, table in roles.items():
        where = f"{source} [roles.{name}]"
        try:
            role = Role(name)
        except ValueError:
            raise PolicyError(where, f"unknown role; roles are {[r.value for r in Role]}") from None
        if not isinstance(table, dict):
            raise PolicyError(where, "must be a table")
        extra = set(table) - {"scope", "create", "write", "datasets", "transitions"}
        if extra:
            raise PolicyError(where, f"unknown keys {sorted(extra)}")
        scope = table.get("scope")
        if scope not in _SCOPES:
            raise PolicyError(where, f"scope must be one of {list(_SCOPES)}, not {scope!r}")
        create = _strings(table.get("create", []), where, "create")
        if set(create) - set(DOC_TYPES):
            raise PolicyError(where, f"create names unknown document types {create}")
        write = table.get("write", {})
        if not isinstance(write, dict) or set(write) - set(DOC_TYPES):
            raise PolicyError(where, f"write must map document types {DOC_TYPES} to paths")
        grants[role] = Grant(
            scope=_SCOPES[scope],
            create=frozenset(create),
            write={t: tuple(_patterns(p, where, f"write.{t}")) for t, p in write.items()},
            datasets=frozenset(_strings(table.get("datasets", []), where, "datasets")),
            transitions=frozenset(_transitions(table.get("transitions", []), where)),
        )
    return grants


def _patterns(value: object, where: str, key: str) -> list[str]:
    items = _strings(value, where, key)
    for item in items:
        parts = item.split(".")
        if item != "*" and (parts[0] == "*" or not all(_SEGMENT.fullmatch(p) for p in parts)):
            raise PolicyError(
                where,
                f"{key}: {item!r} is not a path: '*', or a root then keys or '*' (any one key "
                "or item) separated by dots, e.g. 'notes', 'fields.*', 'checklist.*.done'",
            )
    return items


def _transitions(value: object, where: str) -> list[str]:
    items = _strings(value, where, "transitions")
    for item in items:
        before, sep, after = item.partition(">")
        if item != "*" and (not sep or not before or not after):
            raise PolicyError(where, f"transition {item!r} must be 'from>to' or '*'")
    return items


def _strings(value: object, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(where, f"{key} must be a list of non-empty strings")
    return list(value)
