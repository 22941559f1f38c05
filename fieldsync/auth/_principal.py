"""Who is asking: the principal a verified token describes."""

from __future__ import annotations

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
