"""Kind `ldap`: the organisation's directory (DESIGN.md §7), read every `interval_s` into the
directory table, from which principals get their team and region and by which people disabled
or deleted in the directory lose their sessions before their tokens expire.

A sync reads the users (`user_filter`) and the team groups (`group_filter`) under `base_dn`
with paged searches (RFC 2696), follows groups nested in a team group down to `max_depth`
(a cycle is followed once), and writes the table in one transaction. A person's team is the
team group nearest to them (ties: the first name); a person in none has no team.

Safety: a directory that does not answer leaves the last good copy in place (health
`degraded`); a sync that would disable more than `max_disable_share` of the enabled people is
refused and reported, not applied, so an empty or truncated answer never locks everyone out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidFilterError
from ldap3.operation.search import parse_filter

from fieldsync.adapters._base import AdapterConfigError, Health, HealthState
from fieldsync.adapters._config import AdapterContext, Table, redact_url
from fieldsync.periodic import Periodic
from fieldsync.records import Person
from fieldsync.storage import Directory

__all__ = ["LdapAdapter", "LdapSettings", "build", "dn_key", "read_directory"]

_log = logging.getLogger(__name__)

KIND: Final = "ldap"
TEAM_SOURCES: Final = ("token", "directory", "token_then_directory")

# What the adapter tells the server after each sync it applied: everyone in the table as they
# now are, not only those the sync changed, so that a session that authenticated while a sync
# ran is brought in line by the next (the server closes or rescopes open sessions).
Synced = Callable[[Sequence[Person]], Awaitable[None]]


@dataclass(frozen=True)  # no slots: the class attributes are the defaults `build` reads
class LdapSettings:
    url: str
    bind_dn: str
    bind_password: str = field(repr=False)
    base_dn: str
    user_filter: str = "(objectClass=inetOrgPerson)"
    group_filter: str = "(objectClass=groupOfNames)"
    subject_attribute: str = "uid"
    name_attribute: str = "displayName"  # `cn` when absent
    mail_attribute: str = "mail"
    region_attribute: str = "st"
    supervisor_attribute: str = "manager"  # a DN, read as that person's subject
    team_attribute: str = "cn"  # of a team group: the team's name
    member_attribute: str = "member"
    disabled_filter: str | None = None  # users also matching it are disabled
    interval_s: float = 300.0
    max_disable_share: float = 0.2
    page_size: int = 500
    max_depth: int = 5
    timeout_s: float = 10.0
    team_source: str = "token_then_directory"


def build(name: str, table: Table, context: AdapterContext) -> LdapAdapter:
    settings = LdapSettings(
        url=table.url("url", ("ldap", "ldaps")),
        bind_dn=_dn(table, "bind_dn"),
        bind_password=table.secret("bind_password"),
        base_dn=_dn(table, "base_dn"),
        user_filter=_filter(table, "user_filter", LdapSettings.user_filter),
        group_filter=_filter(table, "group_filter", LdapSettings.group_filter),
        subject_attribute=_attribute(table, "subject_attribute", LdapSettings.subject_attribute),
        name_attribute=_attribute(table, "name_attribute", LdapSettings.name_attribute),
        mail_attribute=_attribute(table, "mail_attribute", LdapSettings.mail_attribute),
        region_attribute=_attribute(table, "region_attribute", LdapSettings.region_attribute),
        supervisor_attribute=_attribute(
            table, "supervisor_attribute", LdapSettings.supervisor_attribute
        ),
        team_attribute=_attribute(table, "team_attribute", LdapSettings.team_attribute),
        member_attribute=_attribute(table, "member_attribute", LdapSettings.member_attribute),
        disabled_filter=_filter(table, "disabled_filter", None),
        interval_s=table.number("interval_s", LdapSettings.interval_s, minimum=0.05),
        max_disable_share=table.number(
            "max_disable_share", LdapSettings.max_disable_share, minimum=0.0, maximum=1.0
        ),
        page_size=table.integer("page_size", LdapSettings.page_size, minimum=1, maximum=10_000),
        max_depth=table.integer("max_depth", LdapSettings.max_depth, minimum=1, maximum=50),
        timeout_s=table.number("timeout_s", LdapSettings.timeout_s, minimum=0.1),
        team_source=table.choice("team_source", TEAM_SOURCES, LdapSettings.team_source),
    )
    if context.directory is None:
        raise AdapterConfigError(name, None, "needs the server's directory table")
    return LdapAdapter(name, settings, context.directory, context.directory_synced)


def _filter(table: Table, key: str, default: str | None) -> Any:
    value = table.text(key, default)
    if value is None:
        return None
    try:
        parse_filter(value, None, False, False, None, False)
    except LDAPInvalidFilterError:
        raise table.error(key, f"is not an LDAP filter (RFC 4515): {value!r}") from None
    return value


def _dn(table: Table, key: str) -> str:
    value = table.text(key)
    try:
        dn_key(value)
    except ValueError as exc:
        raise table.error(key, f"is not a DN (RFC 4514): {exc}") from None
    return value


_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+")


def _attribute(table: Table, key: str, default: str) -> str:
    value = table.text(key, default)
    if not _ATTRIBUTE.fullmatch(value):
        raise table.error(key, f"is not an attribute name: {value!r}")
    return value


# --- distinguished names (RFC 4514) ------------------------------------------------------------

_HEX = re.compile(r"[0-9A-Fa-f]{2}")


def dn_key(dn: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """`dn` as a key that two spellings of one DN share: attribute types lower-case, values
    unescaped (`\\,` and `\\2C` alike, UTF-8 hex pairs decoded) and case-folded (the matching
    rules of the name attributes ignore case), spaces around separators dropped, the values of
    a multi-valued RDN sorted. Raises ValueError for text that is not a DN."""
    rdns: list[tuple[tuple[str, str], ...]] = []
    avas: list[tuple[str, str]] = []
    i, n = 0, len(dn)
    if not dn.strip():
        return ()
    while True:
        equals = dn.find("=", i)
        if equals < 0:
            raise ValueError(f"no `=` after {dn[:i]!r}")
        kind = dn[i:equals].strip().lower()
        if not _ATTRIBUTE.fullmatch(kind):
            raise ValueError(f"bad attribute type {kind!r}")
        i = equals + 1
        value = bytearray()
        trailing = 0  # unescaped spaces at the end, dropped
        while i < n and dn[i] not in ",+;":
            char = dn[i]
            if char == "\\":
                if _HEX.fullmatch(dn[i + 1 : i + 3]):
                    value.append(int(dn[i + 1 : i + 3], 16))
                    i += 3
                elif i + 1 < n:
                    value += dn[i + 1].encode()
                    i += 2
                else:
                    raise ValueError("a DN ends in a lone `\\`")
                trailing = 0
                continue
            if char == " " and not value:
                i += 1
                continue
            trailing = trailing + 1 if char == " " else 0
            value += char.encode()
            i += 1
        if trailing:
            del value[-trailing:]
        try:
            text = value.decode()
        except UnicodeDecodeError:
            raise ValueError("a value is not UTF-8") from None
        avas.append((kind, text.casefold()))
        if i >= n or dn[i] != "+":
            rdns.append(tuple(sorted(avas)))
            avas = []
        if i >= n:
            return tuple(rdns)
        i += 1


# --- one read of the directory (blocking: runs in a thread) ------------------------------------


@dataclass(frozen=True, slots=True)
class DirectoryRead:
    people: list[Person]
    groups: int  # team groups and the groups nested in them


def read_directory(settings: LdapSettings) -> DirectoryRead:
    """Everyone under `base_dn` as the directory describes them now. Raises `LDAPException`."""
    server = ldap3.Server(settings.url, get_info=ldap3.NONE, connect_timeout=settings.timeout_s)
    connection = ldap3.Connection(
        server,
        settings.bind_dn,
        settings.bind_password,
        # Whole seconds: ldap3 packs it into SO_RCVTIMEO as an integer.
        receive_timeout=max(1, math.ceil(settings.timeout_s)),
        raise_exceptions=True,
        read_only=True,
    )
    try:
        connection.bind()
        return _read(connection, settings)
    finally:
        close(connection)


def close(connection: ldap3.Connection) -> None:
    """Unbind, and close the socket even when it never connected (ldap3 keeps a socket whose
    connect failed open)."""
    connection.unbind()
    if connection.socket is not None:
        connection.socket.close()


def _search(
    connection: ldap3.Connection,
    settings: LdapSettings,
    base: str,
    search_filter: str,
    attributes: list[str],
    scope: str = ldap3.SUBTREE,
) -> Iterator[tuple[str, Mapping[str, list[str]]]]:
    """(dn, attributes) of each entry, in pages of `page_size` (RFC 2696)."""
    entries = connection.extend.standard.paged_search(
        base,
        search_filter,
        search_scope=scope,
        attributes=attributes,
        paged_size=settings.page_size,
        generator=True,
    )
    for entry in entries:
        if entry.get("type") == "searchResEntry":
            yield entry["dn"], _values(entry["attributes"])


def _values(attributes: Mapping[str, Any]) -> dict[str, list[str]]:
    """Attribute values as lists of text, by lower-case attribute name."""
    values: dict[str, list[str]] = {}
    for name, value in attributes.items():
        items = value if isinstance(value, list) else [value]
        values[name.lower()] = [
            item.decode(errors="replace") if isinstance(item, bytes) else str(item)
            for item in items
        ]
    return values


def _first(values: Mapping[str, list[str]], attribute: str) -> str | None:
    found = values.get(attribute.lower())
    return found[0] if found else None


def _read(connection: ldap3.Connection, s: LdapSettings) -> DirectoryRead:
    wanted = [
        s.subject_attribute,
        s.name_attribute,
        "cn",
        s.mail_attribute,
        s.region_attribute,
        s.supervisor_attribute,
    ]
    users: dict[tuple[Any, ...], tuple[str, Mapping[str, list[str]]]] = {}
    for dn, values in _search(connection, s, s.base_dn, s.user_filter, wanted):
        subject = _first(values, s.subject_attribute)
        if subject:  # an entry without the attribute cannot be anyone's `sub`
            users[dn_key(dn)] = (subject, values)
    disabled: set[tuple[Any, ...]] = set()
    if s.disabled_filter:
        both = f"(&{s.user_filter}{s.disabled_filter})"
        disabled = {dn_key(dn) for dn, _ in _search(connection, s, s.base_dn, both, ["1.1"])}
    teams, groups = _teams(connection, s, users)
    subjects = {key: subject for key, (subject, _) in users.items()}
    people: dict[str, Person] = {}
    for key, (subject, values) in users.items():
        manager = _first(values, s.supervisor_attribute)
        supervisor = None
        if manager:
            try:
                supervisor = subjects.get(dn_key(manager))
            except ValueError:
                supervisor = None
        if subject in people:
            _log.warning(
                "ldap: %s is the %s of more than one entry; the first kept",
                subject,
                s.subject_attribute,
            )
            continue
        people[subject] = Person(
            subject,
            name=_first(values, s.name_attribute) or _first(values, "cn"),
            mail=_first(values, s.mail_attribute),
            team=teams.get(key),
            region=_first(values, s.region_attribute),
            supervisor=supervisor,
            enabled=key not in disabled,
        )
    return DirectoryRead(list(people.values()), groups)


def _teams(
    connection: ldap3.Connection,
    s: LdapSettings,
    users: Mapping[tuple[Any, ...], tuple[str, object]],
) -> tuple[dict[tuple[Any, ...], str], int]:
    """Each user's team (by DN key), and how many groups were read. A team group's members may
    be groups: they are read by DN and followed down to `max_depth`, each group once per team
    (a cycle ends there). A member that is no DN is a subject (`memberUid`)."""
    attributes = [s.team_attribute, s.member_attribute]
    team_groups = [
        (dn_key(dn), values)
        for dn, values in _search(connection, s, s.base_dn, s.group_filter, attributes)
    ]
    known: dict[tuple[Any, ...], list[str]] = {
        key: values.get(s.member_attribute.lower(), []) for key, values in team_groups
    }

    def members(key: tuple[Any, ...], dn: str) -> list[str]:
        if key not in known:
            try:
                found = list(_search(connection, s, dn, "(objectClass=*)", attributes, ldap3.BASE))
            except LDAPException:
                found = []  # a member that names no entry (deleted, outside our view)
            known[key] = found[0][1].get(s.member_attribute.lower(), []) if found else []
        return known[key]

    # A `memberUid` (RFC 2307 posixGroup) names a person by their subject, not by a DN.
    by_subject = {subject: key for key, (subject, _) in users.items()}
    best: dict[tuple[Any, ...], tuple[int, str]] = {}  # user -> (depth, team)
    for key, values in team_groups:
        team = _first(values, s.team_attribute)
        if not team:
            continue
        seen = {key}
        frontier = [(key, "")]
        for depth in range(1, s.max_depth + 1):
            following: list[tuple[tuple[Any, ...], str]] = []
            for group_key, group_dn in frontier:
                for member in members(group_key, group_dn):
                    try:
                        member_key = dn_key(member)
                    except ValueError:
                        if member not in by_subject:
                            continue
                        member_key = by_subject[member]
                    if member_key in users:
                        if (depth, team) < best.get(member_key, (s.max_depth + 1, "")):
                            best[member_key] = (depth, team)
                    elif member_key not in seen:
                        seen.add(member_key)
                        following.append((member_key, member))
            frontier = following
            if not frontier:
                break
    return {key: team for key, (_, team) in best.items()}, len(known)


# --- the adapter -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did: `applied` false when the directory did not answer or the sync was
    refused (`reason`); `changed` the people whose row changed."""

    applied: bool
    changed: Sequence[Person] = ()
    reason: str = ""


class LdapAdapter:
    def __init__(
        self,
        name: str,
        settings: LdapSettings,
        directory: Directory,
        synced: Synced | None = None,
    ) -> None:
        self.name = name
        self.kind = KIND
        self.settings = settings
        self._directory = directory
        self._synced = synced
        self._periodic = Periodic(f"ldap:{name}", settings.interval_s, self.sync, at_start=True)
        self._lock = asyncio.Lock()
        self._health = Health(HealthState.DEGRADED, "not synced yet")
        self._figures = {
            "users": 0,
            "users_enabled": 0,
            "groups": 0,
            "syncs": 0,
            "errors": 0,
            "refused_syncs": 0,
            "changes": 0,
            "last_sync_at": 0.0,
        }

    @property
    def team_source(self) -> str:
        return self.settings.team_source

    async def start(self) -> None:
        held = await self._directory.people()
        self._count(held)
        if held:
            self._health = Health(HealthState.DEGRADED, "serving the stored copy; not synced yet")
        self._periodic.start()

    async def stop(self) -> None:
        """A sync in progress is abandoned: its table write is one transaction (done or not)."""
        await self._periodic.stop()

    def health(self) -> Health:
        return self._health

    def metrics(self) -> Mapping[str, float]:
        return dict(self._figures)

    async def sync(self) -> SyncResult:
        """Read the directory once and apply it, unless it is unreachable or the sync would
        disable too many people."""
        async with self._lock:
            return await self._sync()

    async def _sync(self) -> SyncResult:
        where = redact_url(self.settings.url)
        try:
            read = await asyncio.to_thread(read_directory, self.settings)
        # Whatever stops a read (the network, the server, an answer that does not parse), the
        # last good copy stays in use and the next sync tries again.
        except Exception as exc:
            self._figures["errors"] += 1
            why = f"directory {where} unreachable ({type(exc).__name__}: {exc})"
            self._health = Health(HealthState.DEGRADED, f"{why}; serving the last good copy")
            _log.warning("ldap %s: %s; keeping the last good copy", self.name, why)
            return SyncResult(False, reason=why)
        held = await self._directory.people()
        enabled = {person.subject for person in held if person.enabled}
        now_enabled = {person.subject for person in read.people if person.enabled}
        lost = enabled - now_enabled
        limit = self.settings.max_disable_share
        if enabled and len(lost) / len(enabled) > limit:
            self._figures["refused_syncs"] += 1
            why = (
                f"sync refused: it would disable {len(lost)} of {len(enabled)} enabled people"
                f" (more than max_disable_share {limit:.0%})"
            )
            self._health = Health(HealthState.DEGRADED, f"{why}; serving the last good copy")
            _log.error("ldap %s: %s", self.name, why)
            return SyncResult(False, reason=why)
        change = await self._directory.replace(read.people, time.time())
        self._figures["syncs"] += 1
        self._figures["changes"] += len(change.changed)
        self._figures["groups"] = read.groups
        self._figures["last_sync_at"] = time.time()
        everyone = await self._directory.people()
        self._count(everyone)
        self._health = Health(HealthState.OK, f"{len(read.people)} people from {where}")
        if self._synced is not None:
            await self._synced(everyone)
        return SyncResult(True, change.changed)

    def _count(self, people: Iterable[Person]) -> None:
        everyone = list(people)
        self._figures["users"] = len(everyone)
        self._figures["users_enabled"] = sum(person.enabled for person in everyone)
