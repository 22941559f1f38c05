"""Cluster mode: several nodes on one PostgreSQL database, one owner per document. A device on
any node edits any document it may; the owner merges, judges and commits it, the device is
acknowledged only once the owner has committed, and a node that stops hands its documents over
without losing an acknowledged edit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from pycrdt import Doc, Map, Text

from fieldsync import documents
from fieldsync.app import ENDPOINTS, FOLLOWER, REPLICATOR, STORE
from fieldsync.auth import DevIssuer, Role
from fieldsync.client import Client
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import CLUSTER_PATH, ServiceWriter
from tests.harness import (
    Server,
    eventually,
    free_port,
    running_server,
    stored_doc,
    work_order,
)
from tests.replication.test_yws import yws

# The session's PostgreSQL database, as the storage tests get it.
from tests.storage.conftest import PostgresSchemas, postgres_schemas  # noqa: F401

SECRET = "cluster-" + secrets.token_hex(16)
ALL = ScopeFilter(ScopeKind.ALL)


@pytest.fixture
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of the test's own (a schema of the session's database)."""
    schemas: PostgresSchemas = request.getfixturevalue("postgres_schemas")
    schema = schemas.take()
    yield schemas.url(schema)
    schemas.give_back(schema)


@asynccontextmanager
async def node(
    tmp_path: Path, issuer: DevIssuer, url: str, name: str, **settings: Any
) -> AsyncIterator[Server]:
    settings = {"cluster_secret": SECRET, **settings}
    async with running_server(
        tmp_path / name, issuer, database_url=url, node_id=name, **settings
    ) as server:
        yield server


@asynccontextmanager
async def two_nodes(
    tmp_path: Path, issuer: DevIssuer, url: str, **a_settings: Any
) -> AsyncIterator[tuple[Server, Server, Client]]:
    """Nodes a and b on one database, and the supervisor's device on a."""
    async with (
        node(tmp_path, issuer, url, "a", **a_settings) as a,
        node(tmp_path, issuer, url, "b") as b,
        device(a, "sam") as sam,
    ):
        yield a, b, sam


async def create(supervisor: Client, doc_id: str) -> None:
    """`doc_id`, assigned to tina, created by the supervisor's device (whose node then holds
    the document's lease)."""
    supervisor.doc(doc_id).apply_update(work_order(doc_id, assignee="tina").get_update())
    await supervisor.wait_acked(doc_id)


@asynccontextmanager
async def device(server: Server, subject: str) -> AsyncIterator[Client]:
    client = server.client(subject)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def fields(client: Client, doc_id: str) -> Map[Any]:
    root: Map[Any] = client.doc(doc_id).get("fields", type=Map)
    return root


def notes(doc: Doc[Any]) -> str:
    return str(doc.get("notes", type=Text))


async def until(check: Callable[[], Awaitable[object]], timeout: float = 20.0) -> None:
    """Wait until `check()` gives something true (state in the database, which has no event)."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state polled here has no event
            await asyncio.sleep(0.02)


async def holder(url: str, doc_id: str) -> str | None:
    """The node holding `doc_id`'s lease, as PostgreSQL records it."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute("SELECT node FROM leases WHERE doc = %s", (doc_id,))
        row = await cursor.fetchone()
        return None if row is None else str(row[0])


async def owner_of(url: str, doc_id: str) -> str:
    node = await holder(url, doc_id)
    assert node is not None, f"{doc_id} has no lease"
    return node


async def test_a_device_on_another_node_edits_through_the_owner_and_is_acked_after_commit(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url) as (a, b, sam):
        await create(sam, "wo:1")
        assert await owner_of(url, "wo:1") == "a"
        async with device(b, "tina") as tina:
            await tina.wait_synced("wo:1")
            assert fields(tina, "wo:1")["title"] == "Inspect pump wo:1"
            tina.doc("wo:1").get("notes", type=Text).insert(0, "from b. ")
            await tina.wait_acked("wo:1")
            # Acknowledged once stored: the owner's commit holds it.
            assert "from b" in notes(await stored_doc(a, "wo:1"))
            # The room is the owner's alone; the other node merged and judged nothing.
            assert b.app[REPLICATOR].loaded == 0
            await eventually(lambda: "from b" in notes(sam.doc("wo:1")), timeout=30)
            # And the other way: the owner's device reaches the device on the other node.
            sam.doc("wo:1").get("notes", type=Text).insert(0, "from a. ")
            await sam.wait_acked("wo:1")
            await eventually(lambda: "from a" in notes(tina.doc("wo:1")), timeout=30)
            assert notes(tina.doc("wo:1")) == notes(sam.doc("wo:1"))


async def test_the_owner_judges_a_write_by_whom_the_directory_says_its_writer_is_now(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    """A supervisor the directory turns into a technician while their device is connected to
    another node than the document's owner: their next write is judged as a technician's by
    the owner, not by the role it had when it subscribed."""
    async with two_nodes(tmp_path, issuer, url) as (a, b, sam):
        sam.doc("wo:1").apply_update(work_order("wo:1", assignee="sam").get_update())
        await sam.wait_acked("wo:1")
        assert await owner_of(url, "wo:1") == "a"
        async with device(b, "sam") as on_b:
            await on_b.wait_synced("wo:1")
            fields(on_b, "wo:1")["title"] = "As a supervisor"
            await on_b.wait_acked("wo:1")
            demoted = await b.app[ENDPOINTS].reauthorise(
                {"sam": lambda p: replace(p, roles=frozenset({Role.TECHNICIAN}))}
            )
            assert demoted == 0  # still connected: the work order is assigned to them
            fields(on_b, "wo:1")["title"] = "As a technician"  # not a technician's to write
            await eventually(
                lambda: any(e["code"] == "forbidden_field" for e in on_b.errors), timeout=30
            )
            stored = await stored_doc(a, "wo:1")
            assert stored.get("fields", type=Map)["title"] == "As a supervisor"


async def test_a_write_the_owner_refuses_reaches_the_device_on_the_other_node_as_such(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url) as (a, b, sam):
        await create(sam, "wo:1")
        async with device(b, "tina") as tina:
            await tina.wait_synced("wo:1")
            fields(tina, "wo:1")["assignee"] = "tom"  # not a technician's to write
            await eventually(
                lambda: any(e["code"] == "forbidden_field" for e in tina.errors), timeout=30
            )
            error = next(e for e in tina.errors if e["code"] == "forbidden_field")
            assert (error["doc"], error["paths"]) == ("wo:1", ["fields.assignee"])
            await eventually(lambda: bool(tina.rejected), timeout=30)
            assert [(doc, reason) for doc, reason, _ in tina.rejected] == [
                ("wo:1", "forbidden_field")
            ]
            # Resynced from the owner: the device holds the owner's document again.
            await eventually(lambda: fields(tina, "wo:1").get("assignee") == "tina", timeout=30)
        stored = await stored_doc(a, "wo:1")
        assert stored.get("fields", type=Map)["assignee"] == "tina"


async def test_rules_run_once_on_the_owner_whichever_node_the_device_is_on(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url) as (a, b, sam), device(a, "tina") as tina_on_a:
        await create(sam, "wo:1")
        await tina_on_a.wait_synced("wo:1")
        async with device(b, "tina") as tina_on_b:
            await tina_on_b.wait_synced("wo:1")
            # assigned → closed is not a technician's to make: corrected by the rules; at the
            # same time the supervisor, on the other node, edits the same document.
            documents.work_order.set_status(
                tina_on_b.doc("wo:1"), "closed", by="tina", role="technician"
            )
            fields(sam, "wo:1")["priority"] = "high"
            await tina_on_b.wait_acked("wo:1")
            await sam.wait_acked("wo:1")
            await eventually(
                lambda: any(e["code"] == "rule_violation" for e in tina_on_b.errors), timeout=30
            )
            for client in (tina_on_b, tina_on_a, sam):
                await eventually(
                    lambda c=client: fields(c, "wo:1")["status"] == "assigned", timeout=30
                )
                await eventually(
                    lambda c=client: fields(c, "wo:1").get("priority") == "high", timeout=30
                )
        store = a.app[STORE]

        async def recorded() -> list[str]:
            return [c.conflict.rule for c in await store.conflicts(ALL, None, 10)]

        await until(recorded)
        # One correction, one conflict record: not one per node that serves a device.
        assert await recorded() == ["status_transition"]
        assert [e["rule"] for e in tina_on_b.errors if e["code"] == "rule_violation"] == [
            "status_transition"
        ]


async def test_a_stopped_owner_hands_its_documents_over_and_no_acknowledged_edit_is_lost(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with node(tmp_path, issuer, url, "b") as b, device(b, "tina") as tina:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(node(tmp_path, issuer, url, "a"))
            sam = await stack.enter_async_context(device(a, "sam"))
            await create(sam, "wo:1")
            await tina.wait_synced("wo:1")
            text = tina.doc("wo:1").get("notes", type=Text)
            for n in range(5):
                text.insert(len(text), f"edit {n}. ")
            await tina.wait_acked("wo:1")
            assert await owner_of(url, "wo:1") == "a"
        # Node a is gone (its leases released on the way out): the device goes on through b.
        text = tina.doc("wo:1").get("notes", type=Text)
        for n in range(5, 10):
            text.insert(len(text), f"edit {n}. ")
        await tina.wait_acked("wo:1", timeout=60)
        assert await owner_of(url, "wo:1") == "b"
        stored = notes(await stored_doc(b, "wo:1"))
        assert all(f"edit {n}. " in stored for n in range(10))
        assert any(r["doc"] == "wo:1" for r in tina.resets)  # it resynced through the new owner


async def test_a_stale_owner_is_fenced_and_its_devices_converge_through_the_new_owner(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url) as (a, b, sam), device(b, "tina") as tina:
        await create(sam, "wo:1")
        await tina.wait_synced("wo:1")
        # Node b holds the lease now, as once a's expired unnoticed (a paused, or cut off from
        # the database): a is a stale owner, its room still loaded.
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                """UPDATE leases SET node = 'b', token = token + 1,
                    expires_at = clock_timestamp() + interval '1 hour' WHERE doc = 'wo:1'"""
            )
        sam.doc("wo:1").get("notes", type=Text).insert(0, "late. ")
        # Refused on a, never acknowledged there; the device resyncs and sends it again,
        # through b, where it is stored once.
        await sam.wait_acked("wo:1", timeout=60)
        assert any(r["reason"] == "lease_lost" for r in sam.resets)
        assert await owner_of(url, "wo:1") == "b"
        assert notes(await stored_doc(b, "wo:1")).count("late. ") == 1
        tina.doc("wo:1").get("notes", type=Text).insert(0, "new owner. ")
        await tina.wait_acked("wo:1", timeout=60)
        for client in (sam, tina):
            await eventually(lambda c=client: "new owner" in notes(c.doc("wo:1")), timeout=30)
            await eventually(lambda c=client: "late" in notes(c.doc("wo:1")), timeout=30)
        assert notes(sam.doc("wo:1")) == notes(tina.doc("wo:1"))
        assert a.app[REPLICATOR].loaded == 0  # a serves its device through b now
        assert b.app[REPLICATOR].loaded == 1


@asynccontextmanager
async def node_process(
    tmp_path: Path, issuer: DevIssuer, url: str, name: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A node in a process of its own (`fieldsync serve`): its base URL and the process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env |= {
        "FIELDSYNC_DATA_DIR": str(tmp_path / name),
        "FIELDSYNC_PORT": str(port),
        "FIELDSYNC_OIDC_ISSUER": issuer.issuer,
        "FIELDSYNC_DATABASE_URL": url,
        "FIELDSYNC_CLUSTER_SECRET": SECRET,
        "FIELDSYNC_NODE_ID": name,
        "FIELDSYNC_LEASE_TTL": "2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fieldsync",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(base + "/v1/ready") as reply:
                        if reply.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield base, process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_an_owner_killed_mid_edit_loses_nothing_acknowledged(
    tmp_path: Path, issuer: DevIssuer, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fieldsync.replication")
    async with (
        node_process(tmp_path, issuer, url, "a") as (a_url, a_process),
        node(tmp_path, issuer, url, "b", lease_ttl=2.0) as b,
        device(b, "tina") as tina,
    ):
        sam = Client(a_url.replace("http", "ws", 1) + "/v1/sync", issuer.issue("sam"))
        await sam.start()
        try:
            await create(sam, "wo:1")
        finally:
            await sam.close()
        assert await owner_of(url, "wo:1") == "a"
        await tina.wait_synced("wo:1")
        text = tina.doc("wo:1").get("notes", type=Text)
        for n in range(5):
            text.insert(len(text), f"edit {n}. ")
        await tina.wait_acked("wo:1")
        a_process.kill()  # SIGKILL: no release, no goodbye; its lease has to expire
        for n in range(5, 10):
            text.insert(len(text), f"edit {n}. ")
        await tina.wait_acked("wo:1", timeout=60)
        assert await owner_of(url, "wo:1") == "b"
        stored = notes(await stored_doc(b, "wo:1"))
        assert [n for n in range(10) if f"edit {n}. " not in stored] == []
        assert notes(tina.doc("wo:1")) == stored
    # Node b asked for the dead node on each of tina's attempts until the lease moved: one
    # warning for the outage, the other attempts at debug level.
    failed = [r for r in caplog.records if r.getMessage().startswith("link to node a")]
    assert [r.levelno for r in failed][:1] == [logging.WARNING]
    assert [r for r in failed[1:] if r.levelno >= logging.WARNING] == []


async def released(url: str, doc_id: str) -> bool:
    """Whether `doc_id`'s lease is free (released, or expired)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute(
            "SELECT expires_at < clock_timestamp() FROM leases WHERE doc = %s", (doc_id,)
        )
        row = await cursor.fetchone()
        return bool(row and row[0])


async def test_an_idle_document_is_released_and_another_node_takes_it_at_once(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with (
        node(tmp_path, issuer, url, "a", idle_seconds=0.2) as a,
        node(tmp_path, issuer, url, "b") as b,
    ):
        async with device(a, "sam") as sam:
            await create(sam, "wo:1")
        assert await owner_of(url, "wo:1") == "a"
        # Nobody replicates it: node a unloads the room and gives its lease up.
        await until(lambda: released(url, "wo:1"))
        assert a.app[REPLICATOR].loaded == 0
        async with device(b, "tina") as tina:
            tina.doc("wo:1").get("notes", type=Text).insert(0, "on b. ")
            await tina.wait_acked("wo:1")
        assert await owner_of(url, "wo:1") == "b"
        assert "on b. " in notes(await stored_doc(b, "wo:1"))


async def test_a_y_websocket_client_on_another_node_syncs_and_is_seen_through_the_owner(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url) as (a, b, sam):
        await create(sam, "wo:1")
        async with yws(a, "wo:1", "sam") as on_a, yws(b, "wo:1", "tina") as on_b:
            await on_a.step1()
            await on_b.step1()
            replica = await on_b.replica()
            assert replica.get("fields", type=Map)["title"] == "Inspect pump wo:1"
            before = replica.get_state()
            replica.get("notes", type=Text).insert(0, "from yws on b. ")
            await on_b.send_update(replica.get_update(before))
            await eventually(lambda: "from yws on b" in notes(sam.doc("wo:1")), timeout=30)
            # Presence crosses the link both ways, never stored.
            await on_b.announce(4242, 1, '{"user":"tina"}')
            await on_a.wait("tina's presence", lambda: 4242 in on_a.presence())
            await on_a.announce(4343, 1, '{"user":"sam"}')
            await on_b.wait("sam's presence", lambda: 4343 in on_b.presence())
        assert b.app[REPLICATOR].loaded == 0


async def test_rest_and_adapters_on_another_node_create_and_edit_through_the_owner(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    erp = Origin(OriginKind.ADAPTER, "erp")
    async with two_nodes(tmp_path, issuer, url) as (_a, b, sam):
        # The supervisor's device asks for a work order that does not exist yet: its node
        # holds the document's lease from then on.
        sam.doc("wo:new")
        await until(lambda: holder(url, "wo:new"))
        body = {"id": "wo:new", "fields": {"number": "N-1", "title": "New", "assignee": "tina"}}
        headers = {"Authorization": f"Bearer {b.token('sam')}"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.post(b.url + "/v1/work-orders", json=body) as created,
        ):
            assert created.status == 201, await created.text()
            assert (await created.json())["fields"]["title"] == "New"
        await eventually(lambda: fields(sam, "wo:new").get("title") == "New", timeout=30)
        assert await owner_of(url, "wo:new") == "a"

        def retitle(doc: Doc[Any]) -> None:
            doc.get("fields", type=Map)["title"] = "Renamed by the ERP"

        writer = ServiceWriter(b.app[REPLICATOR])
        assert await writer.edit("wo:new", retitle, erp) is not None
        await eventually(
            lambda: fields(sam, "wo:new").get("title") == "Renamed by the ERP", timeout=30
        )
        document = await writer.read("wo:new")
        assert document is not None
        assert document["fields"]["title"] == "Renamed by the ERP"
        assert b.app[REPLICATOR].loaded == 0


async def handshake(url: str, secret: str) -> int:
    """The HTTP status a WebSocket handshake with `secret` gets at `url`."""
    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, headers=headers):
                return 101
        except aiohttp.WSServerHandshakeError as refused:
            return refused.status


async def test_the_cluster_listener_takes_only_the_nodes_secret_and_never_logs_it(
    tmp_path: Path, issuer: DevIssuer, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_hex(16)
    async with two_nodes(tmp_path, issuer, url) as (a, _b, sam):
        leases = a.app[REPLICATOR].leases
        assert leases is not None
        link = leases.url + CLUSTER_PATH
        assert [await handshake(link, secret) for secret in (wrong, "", SECRET)] == [401, 401, 101]
        # A node holding another secret cannot serve its devices through this one.
        async with (
            node(tmp_path, issuer, url, "c", cluster_secret=wrong, lease_ttl=1.0) as c,
            device(c, "tina") as tina,
        ):
            await create(sam, "wo:1")
            tina.doc("wo:1")
            await eventually(lambda: bool(tina.errors), timeout=30)
            assert tina.errors[0]["code"] == "resync_required"
            assert not tina.synced["wo:1"].is_set()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET not in logged
    assert wrong not in logged


async def test_a_reassignment_on_the_owner_takes_the_document_from_a_device_on_another_node(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url) as (_a, b, sam), device(b, "tina") as tina:
        await create(sam, "wo:1")
        await tina.wait_synced("wo:1")
        fields(sam, "wo:1")["assignee"] = "tom"
        await sam.wait_acked("wo:1")
        await eventually(
            lambda: any("wo:1" in change["removed"] for change in tina.scope_changes), timeout=30
        )
        assert "wo:1" not in tina.docs
        # Nothing more of it reaches the device: its subscription through the owner is gone.
        sam.doc("wo:1").get("notes", type=Text).insert(0, "for tom only. ")
        await sam.wait_acked("wo:1")
        async with device(b, "tina") as again:
            again.doc("wo:1")
            await eventually(lambda: bool(again.resets) or bool(again.errors), timeout=30)
            assert "for tom only" not in notes(again.doc("wo:1"))


@pytest.mark.parametrize("read_between", [False, True], ids=["one-read", "a-read-between"])
async def test_a_device_on_another_node_is_told_of_each_move_once(
    tmp_path: Path, issuer: DevIssuer, url: str, read_between: bool
) -> None:
    """A move reaches a session served through the owner twice: over the node-to-node link at
    once, and through its own node's change feed follower (driven by hand here: no Redis, no
    polling). Read in one page, a creation and the move after it are one change to tina's node,
    which never showed her the work order (`one-read`); the follower's read between them tells
    her of the creation, and the move the link told her already is not told again."""
    async with (
        node(tmp_path, issuer, url, "a") as a,
        node(tmp_path, issuer, url, "b", feed_poll=3600.0) as b,
        device(a, "sam") as sam,
        device(b, "tina") as tina,
    ):
        follower = b.app[FOLLOWER]
        await create(sam, "wo:1")
        await tina.wait_synced("wo:1")
        if read_between:
            await follower.catch_up()
        fields(sam, "wo:1")["assignee"] = "tom"
        await sam.wait_acked("wo:1")
        await eventually(lambda: bool(tina.scope_changes) and "wo:1" not in tina.docs)
        await follower.catch_up()
        # An answer on the same socket after the follower's read comes after any telling of it.
        tina.doc("wo:absent")
        await eventually(lambda: any(e.get("doc") == "wo:absent" for e in tina.errors))
        told = [(change["added"], change["removed"]) for change in tina.scope_changes]
        assert told == ([(["wo:1"], []), ([], ["wo:1"])] if read_between else [([], ["wo:1"])])


async def test_a_device_leaving_another_node_leaves_the_owners_room_too(
    tmp_path: Path, issuer: DevIssuer, url: str
) -> None:
    async with two_nodes(tmp_path, issuer, url, idle_seconds=0.2) as (a, b, sam):
        await create(sam, "wo:1")
        async with device(b, "tina") as tina:
            await tina.wait_synced("wo:1")
        await sam.close()
        # Neither device replicates it any more, on either node: the owner's room goes idle,
        # is unloaded and its lease given up.
        await until(lambda: released(url, "wo:1"))
        assert a.app[REPLICATOR].loaded == 0
        assert b.app[REPLICATOR].loaded == 0
