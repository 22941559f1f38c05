"""Who is asking: access-token verification (OIDC/JWKS), the principal, its scope, a dev issuer."""

from fieldsync.auth._dev_issuer import DevIssuer, DevUser
from fieldsync.auth._oidc import ClaimMapping, TokenVerifier, bearer_token
from fieldsync.auth._principal import Principal, Role, in_scope, may_create, scope_of

__all__ = [
    "ClaimMapping",
    "DevIssuer",
    "DevUser",
    "Principal",
    "Role",
    "TokenVerifier",
    "bearer_token",
    "in_scope",
    "may_create",
    "scope_of",
]
