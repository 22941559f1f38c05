"""A fake ERP's HTTP API for `erp_http`: maintenance orders, Idempotency-Key semantics and
injected failures, as `FAKE_ERP.md` beside this file describes them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

API = "/api/v1/maintenance-orders"


@dataclass
class StoredOrder:
    number: str
    external_ref: str
    content: dict[str, Any]
    versions: int = 1

    @property
    def status(self) -> str:
        return str((self.content.get("order") or {}).get("status_code") or "CRTD")

    def answer(self) -> dict[str, Any]:
        return {
            "order_number": self.number,
            "status": self.status,
            "external_ref": self.external_ref,
        }


@dataclass
class Stored:
    """A 2xx answer kept under its idempotency key, with the request it answered."""

    request: tuple[str, str, bytes]
    status: int
    body: dict[str, Any]


@dataclass
class FakeErp:
    token: str | None = None
    orders: dict[str, StoredOrder] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._keys: dict[str, Stored] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._release = asyncio.Event()
        self._served = asyncio.Condition()
        self._arrived = 0

    def fail(self, *entries: dict[str, Any]) -> None:
        """Queue failures for the next API requests (`POST /_fake/failures` does the same)."""
        for entry in entries:
            self.failures.extend([entry] * int(entry.get("times", 1)))

    async def release(self) -> None:
        """Let the answers held by `{"hold": true}` go."""
        self._release.set()

    def by_ref(self, external_ref: str) -> list[StoredOrder]:
        return [o for o in self.orders.values() if o.external_ref == external_ref]

    async def arrived(self, count: int) -> None:
        """Wait until `count` API requests have arrived (answered or not)."""
        async with self._served:
            await self._served.wait_for(lambda: self._arrived >= count)

    # --- the app ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(API, self._api)
        app.router.add_patch(API + "/{number}", self._api)
        app.router.add_get(API + "/{number}", self._api)
        app.router.add_post("/_fake/failures", self._inject)
        app.router.add_post("/_fake/release", self._release_held)
        app.router.add_get("/_fake/requests", self._requests)
        return app

    async def _inject(self, request: web.Request) -> web.Response:
        self.fail(*await request.json())
        return web.json_response({"queued": len(self.failures)})

    async def _release_held(self, request: web.Request) -> web.Response:
        self._release.set()
        return web.json_response({})

    async def _requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def _log(self, request: web.Request, status: int | str) -> None:
        async with self._served:
            self.requests.append(
                {
                    "method": request.method,
                    "path": request.raw_path,  # as sent, still percent-encoded
                    "key": request.headers.get("Idempotency-Key"),
                    "status": status,
                }
            )
            self._served.notify_all()

    async def _api(self, request: web.Request) -> web.StreamResponse:
        async with self._served:
            self._arrived += 1
            self._served.notify_all()
        failure = self.failures.pop(0) if self.failures else {}
        if "status" in failure:
            headers = (
                {"Retry-After": str(failure["retry_after"])} if "retry_after" in failure else {}
            )
            await self._log(request, failure["status"])
            return _error(failure["status"], "INJECTED", "injected failure", headers=headers)
        if (
            self.token is not None
            and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            await self._log(request, 401)
            return _error(401, "UNAUTHORIZED", "a valid bearer token is required")
        if request.method == "GET":
            order = self.orders.get(request.match_info["number"])
            await self._log(request, 200 if order else 404)
            if order is None:
                return _error(404, "ORDER_NOT_FOUND", "no such order")
            return web.json_response(
                {**order.answer(), "content": order.content, "versions": order.versions}
            )
        key = request.headers.get("Idempotency-Key")
        if not key:
            await self._log(request, 400)
            return _error(400, "IDEMPOTENCY_KEY_MISSING", "POST and PATCH need an Idempotency-Key")
        raw = await request.read()
        signature = (request.method, request.path, raw)
        async with self._locks.setdefault(key, asyncio.Lock()):
            stored = self._keys.get(key)
            if stored is not None and stored.request != signature:
                status, body, headers = (
                    422,
                    _body("IDEMPOTENCY_KEY_REUSED", "key used for another request"),
                    {},
                )
            elif stored is not None:
                status, body, headers = stored.status, stored.body, {"Idempotent-Replayed": "true"}
            else:
                status, body = self._process(request, raw)
                headers = {}
                if 200 <= status < 300:
                    self._keys[key] = Stored(signature, status, body)
        if failure.get("drop"):
            await self._log(request, "dropped")
            assert request.transport is not None
            request.transport.abort()  # committed, and the answer never leaves
            raise asyncio.CancelledError
        if failure.get("hold"):
            await self._release.wait()
        if "delay_s" in failure:
            await asyncio.sleep(float(failure["delay_s"]))
        await self._log(request, status)
        return web.json_response(body, status=status, headers=headers)

    def _process(self, request: web.Request, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            content = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return 400, _body("INVALID_JSON", "the body is not JSON")
        if not isinstance(content, dict) or not isinstance(content.get("external_ref"), str):
            return 400, _body("INVALID_BODY", "external_ref is required")
        if not (content.get("order") or {}).get("title"):
            return 422, _body("TITLE_REQUIRED", "An order needs a title")
        if request.method == "POST":
            existing = self.by_ref(content["external_ref"])
            if existing:
                body = _body("DUPLICATE_EXTERNAL_REF", "an order with this reference exists")
                body["error"]["order_number"] = existing[0].number
                return 409, body
            order = StoredOrder(str(40000001 + len(self.orders)), content["external_ref"], content)
            self.orders[order.number] = order
            return 201, order.answer()
        stored = self.orders.get(request.match_info["number"])
        if stored is None:
            return 404, _body("ORDER_NOT_FOUND", "no such order")
        order = stored
        if order.status == "CLSD" and content != order.content:
            return 422, _body("ORDER_CLOSED", f"order {order.number} is closed")
        order.content = content
        order.versions += 1
        return 200, order.answer()


def _body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(_body(code, message), status=status, headers=headers)


@asynccontextmanager
async def running_fake_erp(token: str | None = None) -> AsyncIterator[FakeErp]:
    """The fake ERP on a loopback port of its own."""
    fake = FakeErp(token=token)
    runner = web.AppRunner(fake.app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        fake._release.set()
        await runner.cleanup()
