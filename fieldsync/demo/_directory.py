"""The demo's directory, when `--ldap` names one: an `ldap` adapter in the demo's adapters file;
for the demo's users the directory holds, tokens without team and region (as an identity
provider that knows nothing of teams issues them), so that the server takes both from the
directory; and after the simulation, what the directory gave: the summary's `directory` line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidDnError
from ldap3.utils.dn import parse_dn

from fieldsync.adapters import DirectoryAdapter, HealthState, redact_url
from fieldsync.auth import DevUser, Principal, TeamSource, enriched
from fieldsync.errors import AuthError
from fieldsync.storage import Directory as DirectoryTable

if TYPE_CHECKING:
    from fieldsync.demo._server import Running

ADAPTER = "directory"  # the adapter's name in the adapters file
PASSWORD_ENV = "FIELDSYNC_DEMO_LDAP_PASSWORD"  # the bind password: never on the command line
SKIPPED = "skipped: no directory configured (--ldap)"
_TIMEOUT = 5  # seconds the directory has to answer a read
# The people's filter and subject attribute: written into the adapters file and used by `probe`,
# so that the adapter and the demo see the same people.
_PEOPLE, _SUBJECT = "(objectClass=inetOrgPerson)", "uid"
_WAIT = 20.0  # seconds the summary waits for the adapter's first sync


@dataclass(frozen=True)
class LdapOption:
    """Where the demo reads its directory, and as whom (the password: `PASSWORD_ENV`)."""

    url: str
    bind_dn: str
    base_dn: str

    def check(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """What is wrong with these options, None when nothing is."""
        if not self.url.startswith(("ldap://", "ldaps://")):
            return f"--ldap {self.url!r}: expected an ldap:// or ldaps:// URL"
        for option, dn in (("--ldap-bind-dn", self.bind_dn), ("--ldap-base-dn", self.base_dn)):
            if not dn:
                return f"--ldap needs {option}"
            try:
                parse_dn(dn)
            except LDAPInvalidDnError as exc:
                return f"{option} {dn!r} is not a DN: {exc}"
        if not environ.get(PASSWORD_ENV):
            return f"--ldap needs the bind password in the environment variable {PASSWORD_ENV}"
        return None


@dataclass(frozen=True)
class Directory:
    """This run's directory (`ldap` None: none configured) and the subjects it held as the
    demo started."""

    ldap: LdapOption | None = None
    known: frozenset[str] = frozenset()

    def section(self) -> str:
        """The directory's section of the demo's adapters file ("" without one)."""
        if self.ldap is None:
            return ""
        return (
            "\n# The organisation's directory: principals whose token carries no team or region\n"
            "# get them from it (README: ldap).\n"
            f'[adapters.{ADAPTER}]\nkind = "ldap"\nurl = {_toml(self.ldap.url)}\n'
            f"bind_dn = {_toml(self.ldap.bind_dn)}\n"
            f'bind_password = {{ env = "{PASSWORD_ENV}" }}\n'
            f"base_dn = {_toml(self.ldap.base_dn)}\nuser_filter = {_toml(_PEOPLE)}\n"
            f'subject_attribute = "{_SUBJECT}"\ntimeout_s = {_TIMEOUT}\n'
        )

    def users(self, users: Mapping[str, DevUser]) -> dict[str, DevUser]:
        """The issuer's users: those the directory holds without team and region."""
        return {
            subject: dataclasses.replace(user, team=None, region=None)
            if subject in self.known
            else user
            for subject, user in users.items()
        }


def _toml(text: str) -> str:
    """`text` as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


async def probe(ldap: LdapOption | None) -> Directory:
    """Whom the directory holds now; nobody when it does not answer (the adapter meets the same
    and its health says why, in the summary)."""
    if ldap is None:
        return Directory()
    try:
        subjects = await asyncio.to_thread(_subjects, ldap, os.environ.get(PASSWORD_ENV, ""))
    except LDAPException:
        return Directory(ldap)
    return Directory(ldap, frozenset(subjects))


def _subjects(ldap: LdapOption, password: str) -> set[str]:
    """The subjects of the people under the base DN, read in pages (blocking)."""
    server = ldap3.Server(ldap.url, get_info=ldap3.NONE, connect_timeout=_TIMEOUT)
    connection = ldap3.Connection(
        server,
        ldap.bind_dn,
        password,
        receive_timeout=_TIMEOUT,
        raise_exceptions=True,
        read_only=True,
    )
    try:
        connection.bind()
        entries = connection.extend.standard.paged_search(
            ldap.base_dn, _PEOPLE, attributes=[_SUBJECT], paged_size=500, generator=True
        )
        return {
            str(value)
            for entry in entries
            if entry.get("type") == "searchResEntry"
            for value in _listed(entry["attributes"].get(_SUBJECT))
        }
    finally:
        connection.unbind()
        if connection.socket is not None:  # ldap3 leaves a socket that never connected open
            connection.socket.close()


def _listed(value: object) -> list[object]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


async def show(directory: Directory, server: Running, users: Mapping[str, DevUser]) -> str:
    """What the directory gave, once the adapter synced (bounded wait): the people and teams it
    read, and how many of the issuer's `users` the server gives a team or region from it."""
    if directory.ldap is None:
        return SKIPPED
    adapter = next(a for a in server.adapters if isinstance(a, DirectoryAdapter))
    deadline = time.monotonic() + _WAIT
    while not _synced_once(adapter) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the adapter's sync sets no event the demo can wait on
    health = adapter.health()
    if health.state is not HealthState.OK:
        return f"FAILED: {health.detail}"
    table = server.backend.directory
    people = await table.people()
    teams = {person.team for person in people if person.team}
    filled = await _filled(table, TeamSource(adapter.team_source), users)
    return (
        f"{len(people)} people in {len(teams)} teams read from {redact_url(directory.ldap.url)}; "
        f"{filled}/{len(users)} principals' team and region from the directory"
    )


def _synced_once(adapter: DirectoryAdapter) -> bool:
    figures = adapter.metrics()
    return sum(figures.get(n, 0) for n in ("syncs", "errors", "refused_syncs")) > 0


async def _filled(table: DirectoryTable, source: TeamSource, users: Mapping[str, DevUser]) -> int:
    """How many of `users`' principals (as their tokens make them) the server's directory step
    gives a team or region, as it does for every request and socket."""
    filled = 0
    for user in users.values():
        principal = Principal(user.subject, frozenset(), team=user.team, region=user.region)
        try:
            made = enriched(principal, await table.person(user.subject), source)
        except AuthError:  # disabled in the directory: no principal at all
            continue
        filled += bool(made.from_directory)
    return filled
