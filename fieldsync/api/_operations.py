"""Operator endpoints: liveness, readiness, and metrics (for admins and regional managers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from fieldsync.api._problems import problem
from fieldsync.errors import ErrorCode

Metrics = Callable[[], Awaitable[dict[str, object]]]
Ready = Callable[[], Awaitable[dict[str, object] | None]]
# The open replication sessions, each a JSON object (`fieldsync sessions` reads them).
Sessions = Callable[[], list[dict[str, object]]]


class Operations:
    def __init__(self, ready: Ready, metrics: Metrics, sessions: Sessions) -> None:
        self._ready = ready
        self._metrics = metrics
        self._sessions = sessions

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/health", self.health),
            web.get("/v1/ready", self.ready),
            web.get("/v1/metrics", self.metrics),
            web.get("/v1/admin/sessions", self.sessions),
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        state = await self._ready()
        if state is None:
            return problem(ErrorCode.DRAINING, "the server is shutting down")
        return web.json_response({"status": "ready", **state})

    async def metrics(self, request: web.Request) -> web.Response:
        # Operators only: the middleware has checked the token and the role (`_permissions`).
        return web.json_response(await self._metrics())

    async def sessions(self, request: web.Request) -> web.Response:
        # Admins only (`_permissions`): it names every connected user and device. Bounded by
        # the sockets the server holds (`max_sockets_per_subject` each), so one answer.
        sessions = sorted(self._sessions(), key=lambda s: (str(s["connected_at"]), str(s["id"])))
        return web.json_response({"items": sessions})
