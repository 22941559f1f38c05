"""Two nodes on one PostgreSQL database with Redis hints between them: what one node commits
reaches the other node's sessions (scope changes) and dashboards (live views) through the
change feed, woken by a hint, and nothing is lost when the hints are (Redis away).

Each node here polls the feed and refreshes its views only once an hour: a change that reaches
node B came through a hint, or through the read of the feed that follows B's (re)subscription."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from fieldsync.app import FOLLOWER
from fieldsync.auth import DevIssuer
from fieldsync.replication import Control
from tests.cluster.conftest import REDIS, REDIS_URL
from tests.cluster.proxy import TcpProxy
from tests.harness import Server, eventually, running_issuer, running_server, work_order
from tests.wire import Wire, connect

QUIET = {"feed_poll": 3600.0, "views_refresh": 3600.0}


@asynccontextmanager
async def two_nodes(
    tmp_path: Path, url: str, channel: str, redis_b: str = REDIS_URL
) -> AsyncIterator[tuple[Server[DevIssuer], Server[DevIssuer]]]:
    async with (
        running_issuer() as issuer,
        running_server(
            tmp_path / "a",
            issuer,
            database_url=url,
            redis_url=REDIS_URL,
            redis_channel=channel,
            cluster_secret="s",
            **QUIET,
        ) as a,
        running_server(
            tmp_path / "b",
            issuer,
            database_url=url,
            redis_url=redis_b,
            redis_channel=channel,
            cluster_secret="s",
            **QUIET,
        ) as b,
    ):
        yield a, b


@asynccontextmanager
async def greeted(server: Server[DevIssuer], subject: str) -> AsyncIterator[Wire]:
    async with connect(server.sync_url, server.token(subject)) as wire:
        await wire.hello()
        yield wire


async def subscribers(channel: str) -> int:
    client = redis.Redis(host=REDIS[0], port=REDIS[1])
    try:
        ((_, count),) = await client.pubsub_numsub(channel)
        return int(count)
    finally:
        await client.aclose()


async def until_subscribed(channel: str, count: int) -> None:
    for _ in range(2000):
        if await subscribers(channel) == count:
            return
        await eventually(lambda: True)  # a loop turn between two asks
    raise AssertionError(f"{channel} never had {count} subscribers")


async def reassign(sam: Wire, doc_id: str, replica: Any, assignee: str) -> None:
    await sam.edit(doc_id, replica, assignee=assignee)
    await sam.control("ack", doc=doc_id)


async def test_a_reassignment_on_one_node_rescopes_devices_on_the_other(
    tmp_path: Path, url: str, channel: str
) -> None:
    async with two_nodes(tmp_path, url, channel) as (a, b), greeted(a, "sam") as sam:
        await sam.update("wo:1", work_order("wo:1", assignee="tina").get_update())
        await sam.control("ack", doc="wo:1")
        async with greeted(b, "tina") as tina, greeted(b, "tom") as tom:
            await tina.replica("wo:1")  # tina, on B, replicates the work order
            await reassign(sam, "wo:1", await sam.replica("wo:1"), "tom")
            # Live, on the sockets node B holds: no reconnect, no poll.
            await tina.control("scope", removed=["wo:1"])
            await tom.control("scope", added=["wo:1"])


async def test_a_dashboard_on_one_node_sees_commits_made_on_the_other(
    tmp_path: Path, url: str, channel: str
) -> None:
    async with (
        two_nodes(tmp_path, url, channel) as (a, b),
        greeted(b, "sam") as dashboard,
        greeted(a, "sam") as sam,
    ):
        queue = await subscribe(dashboard, "team-queue")
        assert queue["rows"] == []
        await sam.update("wo:2", work_order("wo:2", assignee="tina").get_update())
        await sam.control("ack", doc="wo:2")
        changes = await dashboard.control("view_changes", view="team-queue")
        assert [row["id"] for row in changes["added"]] == ["wo:2"]


async def subscribe(wire: Wire, view: str) -> dict[str, Any]:
    await wire.send(Control({"type": "subscribe", "view": view, "params": {}}))
    return await wire.control("view", view=view)


async def test_hints_lost_while_redis_is_away_lose_no_change(
    tmp_path: Path, url: str, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Node B reaches Redis through a proxy that goes down (a Redis restart, as B sees it):
    what node A commits meanwhile is hinted to nobody, and reaches B's devices and dashboards
    once B subscribes again; the outage is logged once, however many reconnects it took."""
    proxy = TcpProxy(REDIS)
    await proxy.start()
    try:
        async with (
            two_nodes(tmp_path, url, channel, redis_b=proxy.url) as (a, b),
            greeted(a, "sam") as sam,
        ):
            await sam.update("wo:1", work_order("wo:1", assignee="tina").get_update())
            created = await sam.control("ack", doc="wo:1")
            async with greeted(b, "tina") as tina, greeted(b, "sam") as dashboard:
                await tina.replica("wo:1")
                await subscribe(dashboard, "team-queue")
                await until_subscribed(channel, 2)
                follower = b.app[FOLLOWER]
                await eventually(lambda: follower.seq >= created["seq"])
                reads = follower.reads

                with caplog.at_level(logging.INFO, logger="fieldsync.hints"):
                    await proxy.stop()
                    await until_subscribed(channel, 1)  # only A's subscription is left
                    await reassign(sam, "wo:1", await sam.replica("wo:1"), "tom")
                    # B is still away from Redis: nothing has told it of the commit.
                    assert follower.reads == reads
                    await proxy.start()
                    await tina.control("scope", removed=["wo:1"])
                    changes = await dashboard.control("view_changes", view="team-queue")
                    assert [row["id"] for row in changes["changed"]] == ["wo:1"]
                    # The link may carry the scope change first; the resubscription follows.
                    await eventually(lambda: follower.reads > reads)
                    await eventually(
                        lambda: any("is back" in r.getMessage() for r in caplog.records)
                    )
                lost = [r for r in caplog.records if "subscription lost" in r.getMessage()]
                back = [r for r in caplog.records if "subscription is back" in r.getMessage()]
                assert (len(lost), len(back)) == (1, 1)
    finally:
        await proxy.stop()
