"""A real fieldsync server on loopback with a development OpenID issuer, for tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web
from pycrdt import Doc

from fieldsync import documents
from fieldsync.app import STORE, AccessLogger, create_app
from fieldsync.auth import DevIssuer, DevUser
from fieldsync.client import Client
from fieldsync.config import Settings

USERS = {
    u.subject: u
    for u in (
        DevUser("ada", ("admin",), None, None, "Ada Admin"),
        DevUser("mia", ("manager",), None, "east", "Mia Manager"),
        DevUser("sam", ("supervisor",), "north", "east", "Sam Supervisor"),
        DevUser("sue", ("supervisor",), "south", "west", "Sue Supervisor"),
        DevUser("tina", ("technician",), "north", "east", "Tina Tech"),
        DevUser("tom", ("technician",), "north", "east", "Tom Tech"),
        DevUser("ulla", ("technician",), "south", "west", "Ulla Tech"),
        DevUser("nobody", (), None, None, "No Roles"),
    )
}


class Issuer(Protocol):
    """What the server needs of an OpenID provider: its issuer URL. A DevIssuer, or the
    authlib-built provider of `tests/auth/provider.py`."""

    @property
    def issuer(self) -> str: ...


IssuerT = TypeVar("IssuerT", bound=Issuer)


@dataclass
class Server(Generic[IssuerT]):
    url: str
    app: web.Application
    issuer: IssuerT
    data_dir: Path

    @property
    def sync_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/v1/sync"

    def yws_url(self, doc_id: str) -> str:
        return self.url.replace("http", "ws", 1) + f"/v1/yws/{doc_id}"

    def token(self: Server[DevIssuer], subject: str, **kwargs: Any) -> str:
        return self.issuer.issue(subject, **kwargs)

    def client(
        self: Server[DevIssuer], subject: str, path: Path | None = None, **kwargs: Any
    ) -> Client:
        return Client(self.sync_url, self.token(subject), path=path, **kwargs)


@asynccontextmanager
async def running_issuer() -> AsyncIterator[DevIssuer]:
    issuer = DevIssuer(USERS)
    await issuer.start()
    try:
        yield issuer
    finally:
        await issuer.stop()


@asynccontextmanager
async def running_server(
    data_dir: Path, issuer: IssuerT, **settings: Any
) -> AsyncIterator[Server[IssuerT]]:
    config = Settings.load(
        environ={}, data_dir=str(data_dir), oidc_issuer=issuer.issuer, port=0, **settings
    )
    app = create_app(config)
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=2)
    try:
        # Inside the try: a start that fails half-way still closes what it had opened.
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield Server(f"http://127.0.0.1:{port}", app, issuer, data_dir)
    finally:
        await runner.cleanup()


_DONE = ("completed", "closed")


def work_order(
    doc_id: str,
    *,
    assignee: str | None = "tina",
    team: str = "north",
    region: str = "east",
    status: str = "assigned",
    by: str = "sam",
    role: str = "supervisor",
    **fields: Any,
) -> Doc:
    doc: Doc = Doc()
    documents.work_order.write(
        doc,
        {
            "number": doc_id.split(":", 1)[1],
            "title": f"Inspect pump {doc_id}",
            "assignee": assignee,
            "team": team,
            "region": region,
            "status": status,
            **fields,
        },
        # Done when seeded past completion, which the status machine then lets stand.
        [{"id": "c1", "label": "Check seals", "required": True, "done": status in _DONE}],
        "",
        by=by,
        role=role,
    )
    return doc


async def stored_doc(server: Server, doc_id: str) -> Doc:
    """The document as the server's store holds it (snapshot, then the log after it)."""
    stored = await server.app[STORE].load(doc_id)
    assert stored is not None, f"{doc_id} is not stored"
    doc: Doc = Doc()
    for data in ([stored.snapshot] if stored.snapshot else []) + stored.updates:
        doc.apply_update(data)
    return doc


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds, checking on every loop turn (an event-driven wait for
    state that has no event of its own)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the state polled here has no event
            await asyncio.sleep(0.005)
