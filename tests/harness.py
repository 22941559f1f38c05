"""What the tests share: a real fieldsync server on loopback with a development OpenID issuer and
its users, work orders to seed it with, a peer of the replicator without a socket, HTTP answers
and their problem documents, and images to upload. The fixtures built on it are in conftest.py."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import random
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, Protocol

import brotli
import pytest
import zstandard
from aiohttp import web
from PIL import Image
from pycrdt import Doc, Map
from typing_extensions import TypeVar

from fieldsync import documents
from fieldsync.app import STORE, AccessLogger, create_app
from fieldsync.auth import DevIssuer, DevUser, Principal, Role
from fieldsync.client import Client
from fieldsync.config import Settings
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import SyncStep, YSync, decode_y

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


def unavailable(message: str) -> NoReturn:
    """A service or tool a test needs is missing: the test is skipped, or fails where CI says
    that everything must be there (`FIELDSYNC_REQUIRE_SERVICES=1`)."""
    if os.environ.get("FIELDSYNC_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (FIELDSYNC_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def free_port(*offsets: int) -> int:
    """A loopback port p free for a server of the test's own, with p + each of `offsets` free too
    (several servers on consecutive ports). Below Linux's ephemeral range (32768 up), from which
    port-0 servers and outgoing connections draw: one of those could take a port between this
    check and the binding, or while a server killed by the test is down before its restart."""
    for _ in range(200):
        port = random.randrange(20_000, 32_000 - max(offsets, default=0))
        try:
            with ExitStack() as stack:
                for offset in {0, *offsets}:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    raise RuntimeError("no free loopback port")


class Issuer(Protocol):
    """What the server needs of an OpenID provider: its issuer URL. A DevIssuer, or the
    authlib-built provider of `tests/auth/provider.py`."""

    @property
    def issuer(self) -> str: ...


# A bare `Server` is one with the development issuer, as most tests run (PEP 696 default).
IssuerT = TypeVar("IssuerT", bound=Issuer, default=DevIssuer)


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
async def running_issuer(users: Mapping[str, DevUser] = USERS) -> AsyncIterator[DevIssuer]:
    issuer = DevIssuer(users)
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
) -> Doc[Any]:
    doc: Doc[Any] = Doc()
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


async def stored_doc(server: Server, doc_id: str) -> Doc[Any]:
    """The document as the server's store holds it (snapshot, then the log after it)."""
    stored = await server.app[STORE].load(doc_id)
    assert stored is not None, f"{doc_id} is not stored"
    doc: Doc[Any] = Doc()
    for data in ([stored.snapshot] if stored.snapshot else []) + stored.updates:
        doc.apply_update(data)
    return doc


@contextmanager
def write_lock_held(server: Server) -> Iterator[None]:
    """Another connection to the server's SQLite database holds the write lock until the block
    ends (an operator's `sqlite3` shell, a backup tool): a batch of the server's writer that
    waits longer than its busy timeout fails for real ("database is locked") and is rolled
    back."""
    other = sqlite3.connect(server.data_dir / "fieldsync.db", isolation_level=None, timeout=30)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds, checking on every loop turn (an event-driven wait for
    state that has no event of its own)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the state polled here has no event
            await asyncio.sleep(0.005)


class Replica:
    """A peer of the replicator, without a socket: it applies to its own document everything
    the server sends it, and keeps the rule violations it is told of."""

    def __init__(self, subject: str, origin: Origin | None = None) -> None:
        self.principal = Principal(subject, frozenset({Role.ADMIN}))
        self.scope = ScopeFilter(ScopeKind.ALL)
        self.origin = origin or Origin(OriginKind.DEVICE, subject)
        self.doc: Doc[Any] = Doc()
        self.violations: list[tuple[str, str]] = []  # (doc, rule)

    def send_doc(self, doc_id: str, message: bytes) -> None:
        y = decode_y(message)
        if isinstance(y, YSync) and y.step in (SyncStep.STEP2, SyncStep.UPDATE):
            self.doc.apply_update(y.payload)

    def confirmed(self, doc_id: str, update: bytes | None) -> None:
        if update is not None:
            self.doc.apply_update(update)

    def scope_added(self, doc_ids: Sequence[str]) -> None:
        pass

    def scope_removed(self, doc_ids: Sequence[str]) -> None:
        pass

    def rule_violation(self, doc_id: str, rule: str, detail: str) -> None:
        self.violations.append((doc_id, rule))

    def reset(self, doc_id: str, reason: str) -> None:
        raise AssertionError(f"reset {doc_id}: {reason}")

    def edit(self, key: str, value: str | None = None) -> bytes:
        """Set `fields.<key>` (to the subject by default); returns the update."""
        before = self.doc.get_state()
        self.doc.get("fields", type=Map)[key] = value or self.principal.subject
        return self.doc.get_update(before)


# --- HTTP answers ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes  # as sent: still compressed when Content-Encoding says so

    @property
    def json(self) -> Any:
        return json.loads(decoded(self))


def decoded(reply: Reply) -> bytes:
    coding = reply.headers.get("Content-Encoding")
    if coding is None:
        return reply.body
    data: bytes = {
        "br": brotli.decompress,
        "gzip": gzip.decompress,
        "zstd": lambda b: zstandard.ZstdDecompressor().decompress(b),
    }[coding](reply.body)
    return data


def assert_problem(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """`reply` is an RFC 9457 problem document with this status and stable `code`."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = reply.json
    assert (body["status"], body["code"]) == (status, code)
    return body


def png(width: int = 640, height: int = 480, color: str = "teal") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()
