"""A real DevIssuer on a loopback port (tests/conftest.py's `issuer`) with users of its own, and
a TokenVerifier that trusts it, over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import pytest

from fieldsync.auth import DevIssuer, DevUser, TokenVerifier

USERS = {
    "tom": DevUser("u-tom", ("technician",), team="north-1", region="north", name="Tom Tech"),
    "sue": DevUser("u-sue", ("supervisor",), team="north-1", region="north", name="Sue Super"),
    "max": DevUser("u-max", ("manager",), team=None, region="north", name="Max Manager"),
    "ada": DevUser("u-ada", ("admin",), name="Ada Admin", password="s3cret"),
}


@pytest.fixture
def users() -> Mapping[str, DevUser]:
    """Subjects unlike the names they sign in with, a password, a team-less manager."""
    return USERS


@pytest.fixture
async def verifier(issuer: DevIssuer) -> AsyncIterator[TokenVerifier]:
    async with TokenVerifier(issuer.issuer, issuer.audience) as verifier:
        yield verifier
