"""A real OpenLDAP `slapd` for the directory tests: its own configuration in a temporary
directory (slapd.conf, mdb, the core/cosine/inetorgperson/nis schemas of /etc/ldap/schema) on
a free loopback port; never the system's slapd.

Clients other than the rootdn read through `cn=reader`, whose searches are limited to
`SIZE_LIMIT` entries unless paged (RFC 2696): a sync that did not page would fail here."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ldap3
from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE
from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import escape_rdn

from fieldsync.adapters._ldap import close
from tests.harness import free_port, unavailable

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-secret"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "reader-secret"
SIZE_LIMIT = 1000
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap", "/usr/lib/aarch64-linux-gnu/ldap")


def slapd_binary() -> str:
    """slapd's path; skips without it, or fails when CI says it must be there."""
    found = shutil.which("slapd") or shutil.which("slapd", path="/usr/sbin")
    if found is not None:
        return found
    unavailable("the directory tests need OpenLDAP's slapd (apt-get install slapd ldap-utils)")


def _config(root: Path) -> str:
    module_dir = next((d for d in MODULE_DIRS if Path(d, "back_mdb.la").exists()), None)
    modules = f"modulepath {module_dir}\nmoduleload back_mdb\n" if module_dir else ""
    schemas = "".join(f"include /etc/ldap/schema/{name}.schema\n" for name in SCHEMAS)
    return f"""{schemas}{modules}
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
sizelimit size.soft={SIZE_LIMIT} size.hard={SIZE_LIMIT} size.pr=unlimited size.prtotal=unlimited
database mdb
maxsize 268435456
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {root}/data
access to attrs=userPassword by anonymous auth by * none
access to * by * read
"""


class Slapd:
    """One slapd process on `url`, its database under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "slapd.conf").write_text(_config(root))

    def load(self, ldif: str) -> None:
        """Add entries offline (slapadd), before `start`: fast enough for thousands."""
        path = self.root / "seed.ldif"
        path.write_text(ldif)
        slapadd = str(Path(slapd_binary()).with_name("slapadd"))
        subprocess.run(
            [slapadd, "-q", "-f", str(self.root / "slapd.conf"), "-l", str(path)],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        binary = slapd_binary()
        with (self.root / "slapd.log").open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "-d", "0", "-f", str(self.root / "slapd.conf"), "-h", f"{self.url}/"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def ready(self, timeout: float = 10.0) -> None:
        """Wait until it answers a bind (blocking)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                log = (self.root / "slapd.log").read_text(errors="replace")
                raise RuntimeError(f"slapd exited: {log[-2000:]}")
            connection = self.connect(bind=False)
            try:
                connection.bind()
                return
            except LDAPException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # not listening yet: there is nothing to wait on but time
            finally:
                close(connection)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(timeout=10)

    def connect(self, *, bind: bool = True) -> ldap3.Connection:
        """A connection as the rootdn, to change the directory under the adapter."""
        server = ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=2)
        return ldap3.Connection(
            server, ROOT_DN, ROOT_PASSWORD, auto_bind=bind, raise_exceptions=True, receive_timeout=5
        )


def base_entries() -> str:
    return ldif(
        [
            (SUFFIX, {"objectClass": ["dcObject", "organization"], "dc": "example", "o": "Ex"}),
            (
                READER_DN,
                {
                    "objectClass": ["organizationalRole", "simpleSecurityObject"],
                    "cn": "reader",
                    "userPassword": READER_PASSWORD,
                },
            ),
        ]
    )


def ldif(entries: Iterable[tuple[str, Mapping[str, str | Sequence[str]]]]) -> str:
    """LDIF of `entries` (RFC 2849), every value base64 so any text goes through."""
    out = []
    for dn, attributes in entries:
        lines = [f"dn:: {base64.b64encode(dn.encode()).decode()}"]
        for name, value in attributes.items():
            for item in [value] if isinstance(value, str) else value:
                lines.append(f"{name}:: {base64.b64encode(item.encode()).decode()}")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def person_dn(uid: str, ou: str) -> str:
    return f"uid={escape_rdn(uid)},ou={escape_rdn(ou)},{SUFFIX}"


def group_dn(cn: str, ou: str) -> str:
    return f"cn={escape_rdn(cn)},ou={escape_rdn(ou)},{SUFFIX}"


# --- test directories ---------------------------------------------------------------------

TEAM = "(&(objectClass=groupOfNames)(businessCategory=team))"
PEOPLE = 5000
# A subject and a team name that RFC 4514 and 4515 must escape, with non-ASCII in both.
ODD_SUBJECT = 'zoë*(x)\\,+"<>;=# '.strip()
ODD_TEAM = "Nörth *(x)\\, team"


def person_entry(uid: str, ou: str, **extra: str | list[str]) -> tuple[str, dict[str, Any]]:
    return person_dn(uid, ou), {
        "objectClass": ["inetOrgPerson"],
        "uid": uid,
        "cn": f"Person {uid}",
        "sn": uid,
        "mail": f"{uid}@example.org",
        **extra,
    }


def group_entry(
    cn: str, ou: str, members: Sequence[str], team: bool = True
) -> tuple[str, dict[str, Any]]:
    attributes: dict[str, Any] = {"objectClass": ["groupOfNames"], "cn": cn}
    attributes["member"] = list(members)
    if team:
        attributes["businessCategory"] = "team"
    return group_dn(cn, ou), attributes


def ou_entry(ou: str) -> tuple[str, dict[str, Any]]:
    return f"ou={ou},{SUFFIX}", {"objectClass": ["organizationalUnit"], "ou": ou}


def big_directory() -> str:
    """5,000 people (half in `north` directly, half in `south` through a nested group that
    also contains `south` again: a cycle), a team whose name needs escaping with its oddly
    named member, and a chain of groups deeper than `max_depth`."""
    ou = "big"
    uids = [f"u{i:04d}" for i in range(PEOPLE)]
    people = [
        person_entry(
            uid,
            ou,
            displayName=f"Person {i}",
            st="east" if i % 2 else "west",
            **({"manager": person_dn("u0000", ou)} if i else {}),
            **({"employeeType": "disabled"} if uid == "u0003" else {}),
        )
        for i, uid in enumerate(uids)
    ]
    people.append(person_entry(ODD_SUBJECT, ou, displayName="Zoë Ödd", st="nörd"))
    people.append(person_entry("deep", ou))
    half = PEOPLE // 2
    chain = [f"deep{i}" for i in range(1, 8)]
    below = [group_dn(name, ou) for name in chain[1:]] + [person_dn("deep", ou)]
    groups = [
        # u0001 is in north directly and in south through south-sub: the nearest team wins.
        group_entry("north", ou, [person_dn(u, ou) for u in uids[:half]]),
        group_entry(
            "south-sub",
            ou,
            [person_dn(u, ou) for u in [uids[1], *uids[half:]]] + [group_dn("south", ou)],
            team=False,
        ),
        group_entry("south", ou, [group_dn("south-sub", ou)]),
        group_entry(ODD_TEAM, ou, [person_dn(ODD_SUBJECT, ou), group_dn("deep1", ou)]),
        *[
            group_entry(name, ou, [member], team=False)
            for name, member in zip(chain, below, strict=True)
        ],
    ]
    return ldif([ou_entry(ou), *people, *groups])


def table(slapd: Slapd, base: str, **settings: Any) -> dict[str, Any]:
    return {
        "url": slapd.url,
        "bind_dn": READER_DN,
        "bind_password": READER_PASSWORD,
        "base_dn": base,
        "group_filter": TEAM,
        "page_size": 400,
        **settings,
    }


class SmallDirectory:
    """An `ou` of its own on the session's slapd, changed by the test through the rootdn."""

    def __init__(
        self,
        slapd: Slapd,
        people: int = 10,
        teams: Mapping[str, Sequence[str]] | None = None,
        region: str = "east",
    ) -> None:
        """`people` people p0, p1… in teams `north` (the first half) and `south`, or the
        people of `teams` (team -> uids) when given."""
        self.ou = f"t{uuid.uuid4().hex[:10]}"
        self.base = f"ou={self.ou},{SUFFIX}"
        self.conn = slapd.connect()
        if teams is None:
            uids = [f"p{i}" for i in range(people)]
            teams = {"north": uids[: people // 2], "south": uids[people // 2 :]}
        self.uids = [uid for members in teams.values() for uid in members]
        self.add(*ou_entry(self.ou))
        for uid in self.uids:
            self.add(*person_entry(uid, self.ou, st=region))
        for team, members in teams.items():
            self.add(*group_entry(team, self.ou, [person_dn(uid, self.ou) for uid in members]))

    def add(self, dn: str, attributes: dict[str, Any]) -> None:
        self.conn.add(dn, attributes=attributes)

    def delete(self, uid: str) -> None:
        """The entry goes; its group memberships stay, dangling, as they do in a real
        directory without the refint overlay."""
        self.conn.delete(person_dn(uid, self.ou))

    def leave(self, uid: str, team: str) -> None:
        dn = person_dn(uid, self.ou)
        self.conn.modify(group_dn(team, self.ou), {"member": [(MODIFY_DELETE, [dn])]})

    def move(self, uid: str, source: str, target: str) -> None:
        self.leave(uid, source)
        dn = person_dn(uid, self.ou)
        self.conn.modify(group_dn(target, self.ou), {"member": [(MODIFY_ADD, [dn])]})

    def set(self, uid: str, attribute: str, value: str) -> None:
        self.conn.modify(person_dn(uid, self.ou), {attribute: [(MODIFY_REPLACE, [value])]})
