"""The HTTP API: operator endpoints, RFC 9457 problem responses, the per-request checks
(client version, WebSocket origins, deprecations) and every route's declared permission."""

from fieldsync.api._audit import AuditRoutes
from fieldsync.api._auth import AuthHelpers
from fieldsync.api._contract import ContractRoutes, load_spec
from fieldsync.api._dashboard import DashboardRoutes
from fieldsync.api._downloads import Downloads
from fieldsync.api._middleware import install as install_middleware
from fieldsync.api._operations import Operations
from fieldsync.api._outbox import OutboxRoutes, entry_json
from fieldsync.api._permissions import (
    PRINCIPAL,
    ROUTE_PERMISSIONS,
    Permission,
    permission_of,
    undeclared,
)
from fieldsync.api._problems import problem
from fieldsync.api._prometheus import (
    MetricsEndpoint,
    PrometheusObserver,
    ServerState,
    StateCollector,
)
from fieldsync.api._reference import ReferenceEndpoints
from fieldsync.api._screens import ScreenRoutes
from fieldsync.api._teams import TeamRoutes
from fieldsync.api._tus import TusEndpoints
from fieldsync.api._work_orders import WorkOrderRoutes

__all__ = [
    "PRINCIPAL",
    "ROUTE_PERMISSIONS",
    "AuditRoutes",
    "AuthHelpers",
    "ContractRoutes",
    "DashboardRoutes",
    "Downloads",
    "MetricsEndpoint",
    "Operations",
    "OutboxRoutes",
    "Permission",
    "PrometheusObserver",
    "ReferenceEndpoints",
    "ScreenRoutes",
    "ServerState",
    "StateCollector",
    "TeamRoutes",
    "TusEndpoints",
    "WorkOrderRoutes",
    "entry_json",
    "install_middleware",
    "load_spec",
    "permission_of",
    "problem",
    "undeclared",
]
