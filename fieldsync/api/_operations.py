"""Operator endpoints: liveness, readiness, and metrics (for admins and regional managers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from fieldsync.api._problems import problem
from fieldsync.auth import Principal, Role, bearer_token
from fieldsync.errors import AuthError, ErrorCode

Verify = Callable[[str], Awaitable[Principal]]
Metrics = Callable[[], Awaitable[dict[str, object]]]
Ready = Callable[[], Awaitable[dict[str, object] | None]]


class Operations:
    def __init__(self, verify: Verify, ready: Ready, metrics: Metrics) -> None:
        self._verify = verify
        self._ready = ready
        self._metrics = metrics

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/health", self.health),
            web.get("/v1/ready", self.ready),
            web.get("/v1/metrics", self.metrics),
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        state = await self._ready()
        if state is None:
            return problem(ErrorCode.DRAINING, "the server is shutting down")
        return web.json_response({"status": "ready", **state})

    async def metrics(self, request: web.Request) -> web.Response:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return problem(ErrorCode.REAUTHENTICATE, "a bearer token is required")
        try:
            principal = await self._verify(token)
        except AuthError as exc:
            return problem(exc.code, exc.message)
        if not principal.roles & {Role.ADMIN, Role.MANAGER}:
            return problem(ErrorCode.FORBIDDEN, "metrics are for admins and regional managers")
        return web.json_response(await self._metrics())
