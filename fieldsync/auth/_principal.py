"""Who is asking: the principal a verified token describes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    TECHNICIAN = "technician"
    SUPERVISOR = "supervisor"
    MANAGER = "manager"  # regional manager
    ADMIN = "admin"
    # An inbound adapter running in this server (`fieldsync.replication.ServiceWriter`), whose
    # rights the policy declares like any role's. Never taken from a token (`ClaimMapping`).
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    roles: frozenset[Role]
    team: str | None = None
    region: str | None = None
    name: str | None = None
    expires_at: float | None = None  # epoch seconds of the token's `exp`
    # The attributes the directory filled in (`team`, `region`), not the token: a directory
    # change replaces them (`fieldsync.auth.enriched`).
    from_directory: frozenset[str] = frozenset()


# How the layers above learn who is asking: a bearer token in, its principal out; raises
# `fieldsync.errors.AuthError` for a token it refuses (`TokenVerifier.verify` is one).
Verify = Callable[[str], Awaitable[Principal]]
