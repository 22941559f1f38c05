"""Kind `ldap` against a real OpenLDAP slapd (tests/adapters/slapd.py): paged reads of thousands
of people, nested team groups (bounded, cycles survived), names that need RFC 4514/4515
escaping, the safety valve on mass disables, and a directory that goes away and comes back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fieldsync.adapters import AdapterContext, HealthState, Table, build_adapter
from fieldsync.adapters._ldap import LdapAdapter, dn_key
from fieldsync.records import Person
from fieldsync.storage import Directory
from fieldsync.storage._directory import SQLiteDirectory
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.contract import AdapterContract
from tests.adapters.slapd import (
    ODD_SUBJECT,
    ODD_TEAM,
    PEOPLE,
    READER_DN,
    READER_PASSWORD,
    SIZE_LIMIT,
    SUFFIX,
    Slapd,
    SmallDirectory,
    base_entries,
    group_dn,
    group_entry,
    ldif,
    ou_entry,
    person_dn,
    person_entry,
    table,
)
from tests.harness import eventually


@pytest.fixture
def directory(sqlite_store: SQLiteStore) -> SQLiteDirectory:
    return SQLiteDirectory(sqlite_store)


class Changes:
    """What the adapter told the server after each sync it applied."""

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
        directory_synced=changes,
    )


async def known(directory: Directory, subject: str) -> Person:
    """The stored person `subject`, who must be there."""
    person = await directory.person(subject)
    assert person is not None, subject
    return person


def build(context: AdapterContext, values: dict[str, Any]) -> LdapAdapter:
    adapter = build_adapter(Table("people", {"kind": "ldap", **values}, {}), context)
    assert isinstance(adapter, LdapAdapter)
    return adapter


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
    small.add(*group_entry("g3", small.ou, [person_dn("p0", small.ou)], team=False))
    small.add(*group_entry("g2", small.ou, [group_dn("g3", small.ou)], team=False))
    far = group_dn("far", small.ou)
    small.add(*group_entry("g1", small.ou, [group_dn("g2", small.ou), far], team=False))
    small.add(*group_entry("far", small.ou, [group_dn("g1", small.ou)]))  # a team, and a cycle
    shallow = build(adapter_context, table(slapd, small.base, max_depth=3))
    assert (await shallow.sync()).applied
    assert (await known(directory, "p0")).team is None  # far > g1 > g2 > g3 > p0: depth 4
    deep = build(adapter_context, table(slapd, small.base, max_depth=4))
    assert (await deep.sync()).applied
    assert (await known(directory, "p0")).team == "far"


async def test_posix_groups_name_their_members_by_subject(
    slapd: Slapd,
    make_small: Callable[..., SmallDirectory],
    adapter_context: AdapterContext,
    directory: SQLiteDirectory,
) -> None:
    small = make_small(4)
    small.add(
        group_dn("crew", small.ou),
        {"objectClass": ["posixGroup"], "cn": "crew", "gidNumber": "500", "memberUid": ["p0"]},
    )
    settings = table(
        slapd, small.base, group_filter="(objectClass=posixGroup)", member_attribute="memberUid"
    )
    assert (await build(adapter_context, settings).sync()).applied
    assert (await known(directory, "p0")).team == "crew"
    assert (await known(directory, "p1")).team is None


def test_two_spellings_of_one_dn_are_one_key() -> None:
    assert dn_key("CN=Nörth \\2A\\28x\\29\\5C\\2C team , OU=Big,dc=Example") == dn_key(
        "cn=nörth *(x)\\\\\\, team,ou=big,dc=example"
    )
    assert dn_key("cn=a+uid=b,dc=x") == dn_key("uid=B + cn=A,dc=x")
    assert dn_key("cn=a\\,b,dc=x") != dn_key("cn=a,cn=b,dc=x")
    for broken in ("cn", "cn=a\\", "=a"):
        with pytest.raises(ValueError, match=r"no `=`|lone|bad attribute type"):
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
    assert len((await adapter.sync()).changed) == 10
    assert (await adapter.sync()).changed == []

    small.delete("p1")
    small.set("p7", "employeeType", "gone")
    small.move("p2", "north", "south")
    result = await adapter.sync()
    assert result.applied
    changed = {person.subject: person for person in result.changed}
    assert set(changed) == {"p1", "p2", "p7"}
    # The server hears of everyone after each sync (sessions that authenticated meanwhile).
    assert sorted(person.subject for person in changes.calls[-1]) == small.uids
    assert changed["p1"].enabled is False
    assert changed["p7"].enabled is False
    assert changed["p2"].team == "south"
    assert (await known(directory, "p1")).enabled is False  # kept: their tokens stay refused
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
    assert not result.applied
    assert "3 of 10" in result.reason
    assert await directory.people() == before
    assert len(changes.calls) == reported
    health = adapter.health()
    assert health.state is HealthState.DEGRADED
    assert "max_disable_share" in health.detail
    assert adapter.metrics()["refused_syncs"] == 1

    # An answer with nobody in it (a wrong base, an emptied directory) never locks anyone out.
    empty = build(adapter_context, table(slapd, small.base, user_filter="(uid=nobody-here)"))
    assert not (await empty.sync()).applied
    assert all(person.enabled for person in await directory.people())


async def test_a_directory_that_goes_away_mid_run_leaves_the_last_good_copy(
    tmp_path: Path, adapter_context: AdapterContext, directory: SQLiteDirectory
) -> None:
    own = Slapd(tmp_path / "own-slapd")
    own.load(base_entries() + "\n" + ldif([ou_entry("x"), person_entry("solo", "x", st="east")]))
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
