"""The `Directory` contract, run against every backend: the table is what the directory last
answered, with the people it no longer lists kept disabled, and each replace reports exactly
the people it changed."""

from __future__ import annotations

import pytest

from fieldsync.records import Person
from fieldsync.storage import Backend, Directory
from tests.storage.conftest import BackendFactory


@pytest.fixture
def directory(backend: Backend) -> Directory:
    return backend.directory


def person(subject: str, team: str = "north", region: str = "east", enabled: bool = True) -> Person:
    return Person(
        subject, f"Name {subject}", f"{subject}@example.org", team, region, enabled=enabled
    )


async def test_a_replace_reports_what_it_changed_and_keeps_the_departed_disabled(
    directory: Directory,
) -> None:
    first = await directory.replace([person("ann"), person("bob"), person("cy")], 1.0)
    assert {p.subject for p in first.changed} == {"ann", "bob", "cy"}
    assert first.people == 3
    assert (
        await directory.replace([person("ann"), person("bob"), person("cy")], 2.0)
    ).changed == []

    change = await directory.replace([person("ann", team="south"), person("cy")], 3.0)
    assert sorted(change.changed, key=lambda p: p.subject) == [
        person("ann", team="south"),
        person("bob", enabled=False),
    ]
    assert change.people == 3
    assert await directory.person("bob") == person("bob", enabled=False)
    assert await directory.person("nobody") is None
    # Gone already: leaving again changes nothing; coming back re-enables.
    assert (await directory.replace([person("ann", team="south"), person("cy")], 4.0)).changed == []
    back = await directory.replace([person("ann", team="south"), person("bob"), person("cy")], 5.0)
    assert back.changed == [person("bob")]


async def test_a_subject_twice_is_refused_and_changes_nothing(directory: Directory) -> None:
    await directory.replace([person("ann")], 1.0)
    with pytest.raises(ValueError, match="twice"):
        await directory.replace([person("bob"), person("bob", team="south")], 2.0)
    assert [p.subject for p in await directory.people()] == ["ann"]


async def test_members_are_the_enabled_people_of_a_team_by_subject_in_pages(
    directory: Directory,
) -> None:
    people = [person(f"n{i:02d}", region="east" if i % 2 else "west") for i in range(25)]
    people += [person("s1", team="south"), person("off", enabled=False)]
    await directory.replace(people, 1.0)
    first = await directory.members("north", limit=10)
    assert [p.subject for p in first] == [f"n{i:02d}" for i in range(10)]
    rest = await directory.members("north", after=first[-1].subject, limit=100)
    assert len(first) + len(rest) == 25  # `off` is disabled, `s1` of another team
    east = await directory.members("north", region="east", limit=100)
    assert {p.region for p in east} == {"east"}
    assert len(east) == 12
    assert await directory.members("nowhere", limit=10) == []


async def test_the_table_survives_a_reopen(make_backend: BackendFactory) -> None:
    backend = make_backend()
    await backend.open()
    await backend.directory.replace([person("ann"), person("bob")], 1.0)
    await backend.close()
    again = make_backend()
    await again.open()
    try:
        assert [p.subject for p in await again.directory.people()] == ["ann", "bob"]
    finally:
        await again.close()
