"""The HTTP API: operator endpoints, RFC 9457 problem responses, the per-request checks
(client version, WebSocket origins, deprecations) and every route's declared permission."""

from fieldsync.api._auth import AuthHelpers
from fieldsync.api._middleware import install as install_middleware
from fieldsync.api._operations import Operations
from fieldsync.api._permissions import (
    PRINCIPAL,
    ROUTE_PERMISSIONS,
    Permission,
    permission_of,
    undeclared,
)
from fieldsync.api._problems import problem

__all__ = [
    "PRINCIPAL",
    "ROUTE_PERMISSIONS",
    "AuthHelpers",
    "Operations",
    "Permission",
    "install_middleware",
    "permission_of",
    "problem",
    "undeclared",
]
