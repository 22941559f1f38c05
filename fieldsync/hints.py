"""Commit hints between the nodes of a cluster, over Redis pub/sub (`FIELDSYNC_REDIS_URL`).

A hint says only "document D committed as seq S (and moved scope)": it wakes the other nodes'
feed followers (`replication.Follower`), which then read what happened from PostgreSQL's change
feed. Redis is never the truth, so a hint may be lost (Redis down or restarted, a connection
killed, a full buffer) at no cost but latency: the follower polls the feed when hints stop, and
reads it again whenever the subscription is (re)established. Both connections reconnect with
jittered backoff, and an outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["Hint", "RedisHints"]

log = logging.getLogger(__name__)

# Hints waiting to be published at most; beyond, the oldest are dropped (the feed has them).
_BUFFER = 10_000
_TIMEOUT = 5.0  # connect, read and write timeout of a Redis command
_BACKOFF_CAP = 10.0


@dataclass(frozen=True, slots=True)
class Hint:
    doc: str
    seq: int
    scope_changed: bool = False


class _Outage:
    """Logs the start and the end of an outage of one connection, not every failure in it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False
        self.attempt = 0

    def failed(self, error: BaseException) -> float:
        """Note a failure; returns how long to wait before trying again (full jitter)."""
        if not self.down:
            log.warning("redis %s lost (%s): the feed is polled until it is back", self.what, error)
            self.down = True
        delay = random.uniform(0, min(_BACKOFF_CAP, 0.1 * 2**self.attempt))
        self.attempt += 1
        return delay

    def recovered(self) -> None:
        if self.down:
            log.info("redis %s is back", self.what)
        self.down = False
        self.attempt = 0


class RedisHints:
    """Publishes this node's hints on `channel` and hears the other nodes'. `publish` never
    suspends; `start(heard)` calls `heard(hint)` for each hint of another node, and
    `heard(None)` each time the subscription is established (hints may have been missed)."""

    def __init__(self, url: str, channel: str, *, node: str | None = None) -> None:
        self.url = url
        self.channel = channel
        self.node = node or uuid.uuid4().hex
        self._queue: deque[bytes] = deque(maxlen=_BUFFER)
        self._queued = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0  # hints sent, for the tests and the metrics
        self.subscriptions = 0  # times the subscription was established

    def _client(self, role: str) -> redis.Redis:
        # No retry inside redis-py: a dropped connection must reach `_subscribe`, which reads
        # the feed again once subscribed; a silent reconnect would hide the hints lost.
        return redis.Redis.from_url(
            self.url,
            socket_connect_timeout=_TIMEOUT,
            socket_timeout=_TIMEOUT,
            health_check_interval=_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            client_name=f"fieldsync-{role}-{self.node}",
        )

    async def start(self, heard: Callable[[Hint | None], None]) -> None:
        self._tasks = [
            asyncio.create_task(self._publish(), name="fieldsync-hints-publish"),
            asyncio.create_task(self._subscribe(heard), name="fieldsync-hints-subscribe"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def publish(self, hint: Hint) -> None:
        message = {"node": self.node, "doc": hint.doc, "seq": hint.seq}
        if hint.scope_changed:
            message["scope_changed"] = True
        self._queue.append(orjson.dumps(message))
        self._queued.set()

    async def _publish(self) -> None:
        outage = _Outage("publisher")
        client = self._client("pub")
        try:
            while True:
                await self._queued.wait()
                self._queued.clear()
                batch = [self._queue.popleft() for _ in range(len(self._queue))]
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for message in batch:
                            pipe.publish(self.channel, message)
                        await pipe.execute()
                    self.published += len(batch)
                    outage.recovered()
                except (RedisError, OSError) as exc:
                    # Dropped: a hint is only worth sending now; the feed keeps the truth.
                    await asyncio.sleep(outage.failed(exc))
        finally:
            await client.aclose()

    async def _subscribe(self, heard: Callable[[Hint | None], None]) -> None:
        outage = _Outage("subscription")
        while True:
            client = self._client("sub")
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.subscriptions += 1
                outage.recovered()
                heard(None)  # what was published while unsubscribed is read from the feed
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_TIMEOUT
                    )
                    if message is not None and message.get("type") == "message":
                        hint = self._decode(message.get("data"))
                        if hint is not None:
                            heard(hint)
            except (RedisError, OSError) as exc:
                delay = outage.failed(exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(delay)

    def _decode(self, data: object) -> Hint | None:
        """Another node's hint; None for this node's own, or for anything malformed."""
        try:
            body = orjson.loads(data if isinstance(data, bytes | str) else b"")
            if body["node"] == self.node:
                return None
            return Hint(str(body["doc"]), int(body["seq"]), bool(body.get("scope_changed")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
