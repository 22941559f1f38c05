"""Principals enriched from the organisation's directory (DESIGN.md §6): team and region for
tokens that lack them, and the refusal of a person the directory disabled or deleted, without
waiting for their token to expire. One step, applied where a token becomes a principal (the
`Verify` that HTTP and the sockets share) and again when the directory changes under an open
session."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from enum import StrEnum

from fieldsync.auth._principal import Principal, Verify
from fieldsync.errors import AuthError, ErrorCode
from fieldsync.records import Person

__all__ = ["Lookup", "TeamSource", "enriched", "verify_with_directory"]


class TeamSource(StrEnum):
    """Where a principal's team and region come from."""

    TOKEN = "token"  # the token's claims only (the directory still deprovisions)
    DIRECTORY = "directory"  # the directory only: the token's claims are ignored
    TOKEN_THEN_DIRECTORY = "token_then_directory"  # the token's, else the directory's


# The directory's entry for a subject, None when it has none.
Lookup = Callable[[str], Awaitable[Person | None]]


def enriched(principal: Principal, person: Person | None, source: TeamSource) -> Principal:
    """`principal` as the directory's `person` makes it. Raises `AuthError` (reauthenticate)
    when the directory disabled or deleted them. A principal enriched before is enriched
    afresh: what the directory filled then is forgotten first."""
    if person is not None and not person.enabled:
        raise AuthError(ErrorCode.REAUTHENTICATE, "the account is disabled in the directory")
    forgotten = principal.from_directory
    team = None if "team" in forgotten else principal.team
    region = None if "region" in forgotten else principal.region
    filled: set[str] = set()
    if source is not TeamSource.TOKEN and (person is not None or source is TeamSource.DIRECTORY):
        if source is TeamSource.DIRECTORY or team is None:
            team = person.team if person is not None else None
            filled.add("team")
        if source is TeamSource.DIRECTORY or region is None:
            region = person.region if person is not None else None
            filled.add("region")
    return dataclasses.replace(
        principal,
        team=team,
        region=region,
        from_directory=frozenset(
            name for name in filled if {"team": team, "region": region}[name] is not None
        ),
    )


def verify_with_directory(verify: Verify, lookup: Lookup, source: TeamSource) -> Verify:
    """`verify`, then the directory's step: the one `Verify` the server hands HTTP and the
    sockets once a directory adapter is configured."""

    async def verified(token: str) -> Principal:
        principal = await verify(token)
        return enriched(principal, await lookup(principal.subject), source)

    return verified
