"""Principals as the directory makes them (`fieldsync.auth.enriched`): the team and region
source, a re-enrichment after a move, and the refusal of a disabled person."""

from __future__ import annotations

import pytest

from fieldsync.auth import Principal, Role, TeamSource, enriched, verify_with_directory
from fieldsync.errors import AuthError, ErrorCode
from fieldsync.records import Person

TOKEN = Principal("sid", frozenset({Role.SUPERVISOR}), team="token-team", region=None)
NORTH = Person("sid", team="north", region="east")


def test_the_token_then_the_directory() -> None:
    principal = enriched(TOKEN, NORTH, TeamSource.TOKEN_THEN_DIRECTORY)
    assert (principal.team, principal.region) == ("token-team", "east")
    assert principal.from_directory == {"region"}
    # Moved to the west: what the directory filled follows, what the token said stays.
    west = Person("sid", team="south", region="west")
    moved = enriched(principal, west, TeamSource.TOKEN_THEN_DIRECTORY)
    assert (moved.team, moved.region) == ("token-team", "west")


def test_the_directory_alone_and_the_token_alone() -> None:
    assert enriched(TOKEN, NORTH, TeamSource.DIRECTORY).team == "north"
    assert enriched(TOKEN, None, TeamSource.DIRECTORY).team is None  # unknown to the directory
    assert enriched(TOKEN, NORTH, TeamSource.TOKEN) == TOKEN
    assert enriched(TOKEN, None, TeamSource.TOKEN_THEN_DIRECTORY) == TOKEN


def test_a_disabled_person_is_refused_whatever_the_source() -> None:
    for source in TeamSource:
        with pytest.raises(AuthError) as refused:
            enriched(TOKEN, Person("sid", enabled=False), source)
        assert refused.value.code is ErrorCode.REAUTHENTICATE


async def test_the_verify_step_looks_the_subject_up() -> None:
    asked: list[str] = []

    async def verify(token: str) -> Principal:
        return TOKEN

    async def lookup(subject: str) -> Person | None:
        asked.append(subject)
        return NORTH

    verified = verify_with_directory(verify, lookup, TeamSource.DIRECTORY)
    assert (await verified("t")).team == "north"
    assert asked == ["sid"]
