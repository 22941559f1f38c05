"""What every HTTP route requires of its caller, declared in one table.

A route the application registers without an entry here is refused at run time (403, fail
closed) and fails the test suite (`tests/api/test_middleware.py`), so a new endpoint cannot ship
without someone deciding who may call it. The handlers enforce what is declared; the tests drive
every route with and without a token to prove the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from aiohttp import web

from fieldsync.auth import Principal, Role

# The verified principal of a request whose route needs a token (set by the middleware).
PRINCIPAL = web.RequestKey("principal", Principal)


class Permission(StrEnum):
    # No token: load-balancer probes, and what an app needs before it has a token.
    PUBLIC = "public"
    # WebSockets: native clients send `Authorization`, browsers authenticate in-band (first
    # message, or y-websocket's `token` parameter), so the upgrade itself cannot demand a
    # header; the session authenticates, and the policy decides each message.
    IN_BAND = "in_band"
    # Any valid access token, checked by the middleware before the handler runs; what it may
    # read and write is then decided per document by the policy (`fieldsync.auth.Policy`).
    SIGNED_IN = "signed_in"
    # A valid access token of an admin or a regional manager.
    OPERATOR = "operator"
    # A valid access token of an admin: what changes server-authoritative data, such as the
    # adapters importing reference datasets (they sign in as a client with the admin role).
    ADMIN = "admin"
    # The metrics scraper: Prometheus holds no OpenID token, so `/metrics` takes the static
    # scrape token (`FIELDSYNC_METRICS_TOKEN`), which its handler checks (401 without it).
    SCRAPER = "scraper"

    @property
    def roles(self) -> frozenset[Role] | None:
        """The roles allowed, or None when any principal (or anyone, for PUBLIC) is."""
        if self is Permission.OPERATOR:
            return frozenset({Role.ADMIN, Role.MANAGER})
        if self is Permission.ADMIN:
            return frozenset({Role.ADMIN})
        return None


ROUTE_PERMISSIONS: Mapping[tuple[str, str], Permission] = {
    ("GET", "/v1/sync"): Permission.IN_BAND,
    ("GET", "/v1/yws/{doc_id}"): Permission.IN_BAND,
    ("GET", "/v1/health"): Permission.PUBLIC,
    ("GET", "/v1/ready"): Permission.PUBLIC,
    ("GET", "/v1/metrics"): Permission.OPERATOR,
    ("GET", "/metrics"): Permission.SCRAPER,
    # The app's sign-in helpers (issue 3): it has no token yet, or only a refresh token.
    ("GET", "/v1/auth/config"): Permission.PUBLIC,
    ("POST", "/v1/auth/token"): Permission.PUBLIC,
    # Reference data (issue 4): adapters import, devices read the datasets the policy gives
    # their role (the handlers check `Policy.datasets`; other names look absent).
    ("PUT", "/v1/reference/{dataset}"): Permission.ADMIN,
    ("PATCH", "/v1/reference/{dataset}"): Permission.ADMIN,
    ("GET", "/v1/reference/{dataset}/changes"): Permission.SIGNED_IN,
    ("GET", "/v1/reference/{dataset}/snapshot"): Permission.SIGNED_IN,
    # Attachments (issue 5). tus 1.0 OPTIONS says what the server speaks, and clients ask it
    # before they hold a token. Uploads are the creator's alone, content is for whoever sees a
    # work order that references it, thumbnails for supervisors and above: the handlers decide,
    # per upload and per content, as the policy decides per document.
    ("OPTIONS", "/v1/uploads"): Permission.PUBLIC,
    ("POST", "/v1/uploads"): Permission.SIGNED_IN,
    ("GET", "/v1/uploads/{upload_id}"): Permission.SIGNED_IN,
    ("PATCH", "/v1/uploads/{upload_id}"): Permission.SIGNED_IN,
    ("DELETE", "/v1/uploads/{upload_id}"): Permission.SIGNED_IN,
    ("GET", "/v1/attachments/{sha256}"): Permission.SIGNED_IN,
    ("GET", "/v1/attachments/{sha256}/thumbnail"): Permission.SIGNED_IN,
    # Screens and the REST side of replication (issue 5): what each caller sees is its policy
    # scope, per document; the team queue (supervisors) and the region metrics (managers)
    # refuse other roles in their handlers.
    ("GET", "/v1/screens/my-work"): Permission.SIGNED_IN,
    ("GET", "/v1/screens/work-order/{doc_id}"): Permission.SIGNED_IN,
    ("GET", "/v1/screens/team-queue"): Permission.SIGNED_IN,
    ("GET", "/v1/screens/region-metrics"): Permission.SIGNED_IN,
    ("GET", "/v1/changes"): Permission.SIGNED_IN,
    ("GET", "/v1/work-orders/{doc_id}"): Permission.SIGNED_IN,
    ("POST", "/v1/work-orders"): Permission.SIGNED_IN,
    # The people of a team (the directory adapter's table): the handler scopes it by the
    # policy, as documents are (a supervisor its team, a manager its region's, an admin all).
    ("GET", "/v1/teams/{team}/members"): Permission.SIGNED_IN,
    # Dashboards' acts on one work order, through the device write path as the caller: the
    # policy's field rights and the rules decide.
    ("POST", "/v1/work-orders/{doc_id}/reassign"): Permission.SIGNED_IN,
    ("POST", "/v1/work-orders/{doc_id}/cancel"): Permission.SIGNED_IN,
    # Audit (issue 4): supervisors, managers and admins, checked in the handler per document.
    ("GET", "/v1/work-orders/{doc_id}/history"): Permission.SIGNED_IN,
    ("GET", "/v1/conflicts"): Permission.SIGNED_IN,
    # The outbox (adapters): its entries, dead letters among them, and an operator's acts on
    # them, for admins only (they name documents of every scope, and change what the ERP gets).
    ("GET", "/v1/admin/outbox"): Permission.ADMIN,
    # Who is connected now (`fieldsync sessions`): every user's and device's name, admins only.
    ("GET", "/v1/admin/sessions"): Permission.ADMIN,
    ("POST", "/v1/admin/outbox/{entry_id}/retry"): Permission.ADMIN,
    ("POST", "/v1/admin/outbox/{entry_id}/skip"): Permission.ADMIN,
    # The contract (issue 5): the OpenAPI document and its reference page, for anyone who
    # builds a client, before any token.
    ("GET", "/v1/openapi.json"): Permission.PUBLIC,
    ("GET", "/v1/docs"): Permission.PUBLIC,
    # The web dashboard's static files (issue: live dashboards): the page signs in itself and
    # reads everything else with the user's token.
    ("GET", "/dashboard/"): Permission.PUBLIC,
    ("GET", "/dashboard/{asset}"): Permission.PUBLIC,
}


def route_key(route: web.AbstractRoute) -> tuple[str, str] | None:
    """(method, path pattern) of a route, as `ROUTE_PERMISSIONS` names it; HEAD is GET without
    a body (RFC 9110 §9.3.2), so it needs what GET needs."""
    resource = route.resource
    if resource is None:
        return None
    method = "GET" if route.method == "HEAD" else route.method
    return method, resource.canonical


def permission_of(route: web.AbstractRoute) -> Permission | None:
    key = route_key(route)
    return None if key is None else ROUTE_PERMISSIONS.get(key)


def undeclared(routes: Iterable[web.AbstractRoute]) -> list[str]:
    """The routes (as 'METHOD /path') that declare no permission."""
    return sorted(
        f"{route.method} {key[1] if (key := route_key(route)) else route}"
        for route in routes
        if permission_of(route) is None
    )
