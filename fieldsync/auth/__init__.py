"""Who is asking: access-token verification (OIDC/JWKS), the principal, its scope, a dev issuer."""

from fieldsync.auth._dev_issuer import DevIssuer, DevUser
from fieldsync.auth._directory import Lookup, TeamSource, enriched, verify_with_directory
from fieldsync.auth._oidc import ClaimMapping, TokenVerifier, bearer_token
from fieldsync.auth._policy import Grant, Policy, PolicyError, in_scope, path_allowed
from fieldsync.auth._principal import Principal, Role, Verify
from fieldsync.auth._versions import required_version, version_tuple

__all__ = [
    "ClaimMapping",
    "DevIssuer",
    "DevUser",
    "Grant",
    "Lookup",
    "Policy",
    "PolicyError",
    "Principal",
    "Role",
    "TeamSource",
    "TokenVerifier",
    "Verify",
    "bearer_token",
    "enriched",
    "in_scope",
    "path_allowed",
    "required_version",
    "verify_with_directory",
    "version_tuple",
]
