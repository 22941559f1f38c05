"""Kind `ldap` against a real OpenLDAP slapd (tests/adapters/slapd.py): paged reads of thousands
of people, nested team groups (bounded, cycles survived), names that need RFC 4514/4515
escaping, the safety valve on mass disables, and a directory that goes away and comes back."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

from fieldsync.adapters import AdapterContext, HealthState, Table, build_adapter
from fieldsync.adapters._ldap import LdapAdapter, dn_key
from fieldsync.records import Person
from fieldsync.storage._directory import SQLiteDirectory
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.contract import AdapterContract
from tests.adapters.slapd import (
    READER_DN,
    READER_PASSWORD,
    SIZE_LIMIT,
    SUFFIX,
    Slapd,
    base_entries,
    group_dn,
    ldif,
    person_dn,
)
from tests.harness import eventually

TEAM = "(&(objectClass=groupOfNames)(businessCategory=team))"
PEOPLE = 5000
# A subject and a team name that RFC 4514 and 4515 must escape, with non-ASCII in both.
ODD_SUBJECT = 'zoë*(x)\\,+"<>;=# '.strip()
ODD_TEAM = "Nörth *(x)\\, team"


def _person(uid: str, ou: str, **extra: str | list[str]) -> tuple[str, dict[str, Any]]:
    return person_dn(uid, ou), {
        "objectClass": ["inetOrgPerson"],
        "uid": uid,
        "cn": f"Person {uid}",
        "sn": uid,
        "mail": f"{uid}@example.org",
        **extra,
    }


def _group(
    cn: str, ou: str, members: Sequence[str], team: bool = True
) -> tuple[str, dict[str, Any]]:
    attributes: dict[str, Any] = {"objectClass": ["groupOfNames"], "cn": cn}
    attributes["member"] = list(members)
    if team:
        attributes["businessCategory"] = "team"
    return group_dn(cn, ou), attributes


def _ou(ou: str) -> tuple[str, dict[str, Any]]:
    return f"ou={ou},{SUFFIX}", {"objectClass": ["organizationalUnit"], "ou": ou}


def big_directory() -> str:
    """5,000 people (half in `north` directly, half in `south` through a nested group that
    also contains `south` again: a cycle), a team whose name needs escaping with its oddly
    named member, and a chain of groups deeper than `max_depth`."""
    ou = "big"
    uids = [f"u{i:04d}" for i in range(PEOPLE)]
    people = [
        _person(
            uid,
            ou,
            displayName=f"Person {i}",
            st="east" if i % 2 else "west",
            **({"manager": person_dn("u0000", ou)} if i else {}),
            **({"employeeType": "disabled"} if uid == "u0003" else {}),
        )
        for i, uid in enumerate(uids)
    ]
    people.append(_person(ODD_SUBJECT, ou, displayName="Zoë Ödd", st="nörd"))
    people.append(_person("deep", ou))
    half = PEOPLE // 2
    chain = [f"deep{i}" for i in range(1, 8)]
    below = [group_dn(name, ou) for name in chain[1:]] + [person_dn("deep", ou)]
    groups = [
        # u0001 is in north directly and in south through south-sub: the nearest team wins.
        _group("north", ou, [person_dn(u, ou) for u in uids[:half]]),
        _group(
            "south-sub",
            ou,
            [person_dn(u, ou) for u in [uids[1], *uids[half:]]] + [group_dn("south", ou)],
            team=False,
        ),
        _group("south", ou, [group_dn("south-sub", ou)]),
        _group(ODD_TEAM, ou, [person_dn(ODD_SUBJECT, ou), group_dn("deep1", ou)]),
        *[
            _group(name, ou, [member], team=False)
            for name, member in zip(chain, below, strict=True)
        ],
    ]
    return ldif([_ou(ou), *people, *groups])


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One slapd for the session, seeded with `big_directory()` under `ou=big`; tests that
    change the directory do it in an `ou` of their own."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.load(base_entries() + "\n" + big_directory())
    server.start()
    try:
        server.ready()
        yield server
    finally:
        server.stop()


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


@pytest.fixture
def make_small(slapd: Slapd) -> Iterator[Callable[..., SmallDirectory]]:
    """Makes `SmallDirectory`s, their connections closed after the test."""
    made: list[SmallDirectory] = []

    def make(people: int = 10) -> SmallDirectory:
        made.append(SmallDirectory(slapd, people))
        return made[-1]

    yield make
    for directory in made:
        directory.conn.unbind()


@pytest.fixture
def directory(sqlite_store: SQLiteStore) -> SQLiteDirectory:
    return SQLiteDirectory(sqlite_store)


class Changes:
    """What the adapter told the server a sync changed."""

    def __init__(self) -> None:
        self.calls: list[list[Person]] = []

    async def __call__(self, people: Sequence[Person]) -> None:
        self.calls.append(list(people))


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def adapter_context(
    tmp_path: Path, sqlite_store: SQLiteStore, directory: SQLiteDirectory, changes: Changes
) -> AdapterContext:
    return AdapterContext(
        tmp_path,
        SQLiteOutbox(sqlite_store),
        SQLiteReference(sqlite_store),
        directory=directory,
        directory_changed=changes,
    )


def build(context: AdapterContext, values: dict[str, Any]) -> LdapAdapter:
    adapter = build_adapter(Table("people", {"kind": "ldap", **values}, {}), context)
    assert isinstance(adapter, LdapAdapter)
    return adapter


class SmallDirectory:
    """An `ou` of its own on the session's slapd, changed by the test through the rootdn."""

    def __init__(self, slapd: Slapd, people: int = 10) -> None:
        self.ou = f"t{uuid.uuid4().hex[:10]}"
        self.base = f"ou={self.ou},{SUFFIX}"
        self.conn = slapd.connect()
        self.uids = [f"p{i}" for i in range(people)]
        for dn, attributes in [
            _ou(self.ou),
            *[_person(uid, self.ou, st="east") for uid in self.uids],
            _group("north", self.ou, [person_dn(uid, self.ou) for uid in self.uids[: people // 2]]),
            _group("south", self.ou, [person_dn(uid, self.ou) for uid in self.uids[people // 2 :]]),
        ]:
            self.add(dn, attributes)

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


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_thousands_of_people_are_read_in_pages_with_their_nested_teams(
    slapd: Slapd, adapter_context: AdapterContext, directory: SQLiteDirectory
) -> None:
    assert PEOPLE > SIZE_LIMIT  # slapd refuses an unpaged search of them all to the reader
    adapter = build(
        adapter_context,
        table(slapd, f"ou=big,{SUFFIX}", disabled_filter="(employeeType=disabled)"),
    )
    result = await adapter.sync()
    assert result.applied, result.reason

    people = {person.subject: person for person in await directory.people()}
    assert len(people) == PEOPLE + 2
    assert adapter.metrics()["users"] == PEOPLE + 2
    assert people["u0002"] == Person(
        "u0002", "Person 2", "u0002@example.org", "north", "west", "u0000", True
    )
    assert people["u0003"].enabled is False  # matches `disabled_filter`
    assert people["u0001"].team == "north"  # directly in north, nested in south: nearest wins
    assert people["u4999"].team == "south"  # through south-sub, which contains south (a cycle)
    assert people["u4999"].supervisor == "u0000"
    odd = people[ODD_SUBJECT]
    assert (odd.team, odd.name, odd.region) == (ODD_TEAM, "Zoë Ödd", "nörd")
    assert people["deep"].team is None  # seven groups down: beyond max_depth (5)
    assert adapter.health().state is HealthState.OK


async def test_deep_enough_nesting_reaches_the_team(
    slapd: Slapd,
    make_small: Callable[..., SmallDirectory],
    adapter_context: AdapterContext,
    directory: SQLiteDirectory,
) -> None:
    small = make_small(6)
    small.leave("p0", "north")
    small.add(*_group("g3", small.ou, [person_dn("p0", small.ou)], team=False))
    small.add(*_group("g2", small.ou, [group_dn("g3", small.ou)], team=False))
    far = group_dn("far", small.ou)
    small.add(*_group("g1", small.ou, [group_dn("g2", small.ou), far], team=False))
    small.add(*_group("far", small.ou, [group_dn("g1", small.ou)]))  # a team, and a cycle
    shallow = build(adapter_context, table(slapd, small.base, max_depth=3))
    assert (await shallow.sync()).applied
    assert (await directory.person("p0")).team is None  # far > g1 > g2 > g3 > p0: depth 4
    deep = build(adapter_context, table(slapd, small.base, max_depth=4))
    assert (await deep.sync()).applied
    assert (await directory.person("p0")).team == "far"


def test_two_spellings_of_one_dn_are_one_key() -> None:
    assert dn_key("CN=Nörth \\2A\\28x\\29\\5C\\2C team , OU=Big,dc=Example") == dn_key(
        "cn=nörth *(x)\\\\\\, team,ou=big,dc=example"
    )
    assert dn_key("cn=a+uid=b,dc=x") == dn_key("uid=B + cn=A,dc=x")
    assert dn_key("cn=a\\,b,dc=x") != dn_key("cn=a,cn=b,dc=x")
    for broken in ("cn", "cn=a\\", "=a"):
        with pytest.raises(ValueError):
            dn_key(broken)


# --- changes and safety ----------------------------------------------------------------------


async def test_a_deleted_or_disabled_person_is_disabled_and_reported(
    slapd: Slapd,
    make_small: Callable[..., SmallDirectory],
    adapter_context: AdapterContext,
    directory: SQLiteDirectory,
    changes: Changes,
) -> None:
    small = make_small(10)
    settings = table(slapd, small.base, disabled_filter="(employeeType=gone)")
    adapter = build(adapter_context, settings)
    assert (await adapter.sync()).applied
    assert len(changes.calls[-1]) == 10
    assert (await adapter.sync()).changed == []  # nothing changed, nothing reported

    small.delete("p1")
    small.set("p7", "employeeType", "gone")
    small.move("p2", "north", "south")
    result = await adapter.sync()
    assert result.applied
    changed = {person.subject: person for person in changes.calls[-1]}
    assert set(changed) == {"p1", "p2", "p7"}
    assert changed["p1"].enabled is False and changed["p7"].enabled is False
    assert changed["p2"].team == "south"
    assert (await directory.person("p1")).enabled is False  # kept: their tokens stay refused
    assert [p.subject for p in await directory.members("north", limit=10)] == ["p0", "p3", "p4"]


async def test_a_sync_that_would_disable_too_many_is_refused_not_applied(
    slapd: Slapd,
    make_small: Callable[..., SmallDirectory],
    adapter_context: AdapterContext,
    directory: SQLiteDirectory,
    changes: Changes,
) -> None:
    small = make_small(10)
    adapter = build(adapter_context, table(slapd, small.base, max_disable_share=0.2))
    assert (await adapter.sync()).applied
    before = await directory.people()
    reported = len(changes.calls)

    for uid in small.uids[:3]:  # 30 % of them
        small.delete(uid)
    result = await adapter.sync()
    assert not result.applied and "3 of 10" in result.reason
    assert await directory.people() == before
    assert len(changes.calls) == reported
    health = adapter.health()
    assert health.state is HealthState.DEGRADED and "max_disable_share" in health.detail
    assert adapter.metrics()["refused_syncs"] == 1

    # An answer with nobody in it (a wrong base, an emptied directory) never locks anyone out.
    empty = build(adapter_context, table(slapd, small.base, user_filter="(uid=nobody-here)"))
    assert not (await empty.sync()).applied
    assert all(person.enabled for person in await directory.people())


async def test_a_directory_that_goes_away_mid_run_leaves_the_last_good_copy(
    tmp_path: Path, adapter_context: AdapterContext, directory: SQLiteDirectory
) -> None:
    own = Slapd(tmp_path / "own-slapd")
    own.load(base_entries() + "\n" + ldif([_ou("x"), _person("solo", "x", st="east")]))
    own.start()
    try:
        own.ready()
        adapter = build(adapter_context, table(own, f"ou=x,{SUFFIX}", interval_s=0.1, timeout_s=1))
        await adapter.start()
        try:
            await eventually(lambda: adapter.health().state is HealthState.OK)
            own.stop()
            await eventually(lambda: adapter.health().state is HealthState.DEGRADED)
            assert "unreachable" in adapter.health().detail
            assert adapter.metrics()["errors"] >= 1
            assert await directory.person("solo") == Person(
                "solo", "Person solo", "solo@example.org", None, "east", None, True
            )
            own.start()
            await eventually(lambda: adapter.health().state is HealthState.OK, timeout=20)
        finally:
            await adapter.stop()
    finally:
        own.stop()


async def test_a_restarted_adapter_serves_the_stored_copy_until_it_syncs(
    tmp_path: Path, adapter_context: AdapterContext, directory: SQLiteDirectory
) -> None:
    await directory.replace([Person("kept", team="north")], 1.0)
    adapter = build(adapter_context, table_for_nowhere())
    await adapter.start()
    try:
        assert adapter.metrics()["users"] == 1
        assert adapter.health().state is HealthState.DEGRADED
    finally:
        await adapter.stop()
    assert await directory.person("kept") == Person("kept", team="north")


def table_for_nowhere() -> dict[str, Any]:
    """A directory nobody answers at (a closed loopback port), tried once a minute."""
    return {
        "url": "ldap://127.0.0.1:9",
        "bind_dn": READER_DN,
        "bind_password": READER_PASSWORD,
        "base_dn": SUFFIX,
        "interval_s": 60,
        "timeout_s": 1,
    }


# --- the shared contract -----------------------------------------------------------------------


class TestLdapContract(AdapterContract):
    kind = "ldap"

    @pytest.fixture(autouse=True)
    def _slapd(self, slapd: Slapd) -> None:
        self.slapd = slapd

    def good_table(self) -> dict[str, Any]:
        return table(self.slapd, f"ou=big,{SUFFIX}", interval_s=3600)

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"url": "http://127.0.0.1"}, "url"),
            ({"bind_password": ""}, "bind_password"),
            ({"base_dn": "not a dn"}, "base_dn"),
            ({"user_filter": "(uid=a"}, "user_filter"),
            ({"group_filter": "objectClass=*)("}, "group_filter"),
            ({"subject_attribute": "uid;x"}, "subject_attribute"),
            ({"interval_s": 0}, "interval_s"),
            ({"max_disable_share": 1.5}, "max_disable_share"),
            ({"team_source": "guess"}, "team_source"),
            ({"page_size": 0}, "page_size"),
        ]
