"""`fieldsync cluster` (`make cluster`): a local cluster on this machine's PostgreSQL and Redis.

It creates the database when missing, runs the demo's development OpenID issuer in this
process, and starts N `fieldsync serve` processes on consecutive ports, each its own node
(`FIELDSYNC_NODE_ID`, its node-to-node listener) sharing the database, the Redis channel, the
cluster secret and the attachments folder. The three-node kill test drives the same class.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import psycopg

from fieldsync.auth import DevIssuer

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"
HOST = "127.0.0.1"
_READY_SECONDS = 60.0
_STOP_SECONDS = 15.0


@dataclass
class Node:
    id: str
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def sync_url(self) -> str:
        return f"ws://{HOST}:{self.port}/v1/sync"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class LocalCluster:
    """`nodes` fieldsync processes on ports `port`, `port + 1`…, their node-to-node listeners
    100 ports above, on database `database` of the PostgreSQL server `postgres`."""

    issuer: DevIssuer
    data_dir: Path
    nodes: int = 3
    port: int = 8081
    postgres: str = POSTGRES
    database: str = "fieldsync_cluster"
    redis: str = REDIS
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    env: dict[str, str] = field(default_factory=dict)  # more FIELDSYNC_* for every node
    members: list[Node] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return f"{self.postgres}/{self.database}"

    @property
    def sync_urls(self) -> list[str]:
        return [node.sync_url for node in self.members]

    async def start(self) -> None:
        """Create the database if needed, start every node and wait until each is ready."""
        await asyncio.to_thread(self._create_database)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.members = [
            Node(f"node-{n + 1}", self.port + n, self.data_dir / f"node-{n + 1}.log")
            for n in range(self.nodes)
        ]
        for node in self.members:
            await self.spawn(node)
        await asyncio.gather(*(self.ready(node) for node in self.members))

    def _create_database(self) -> None:
        with psycopg.connect(f"{self.postgres}/postgres", autocommit=True) as admin:
            exists = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                admin.execute(f'CREATE DATABASE "{self.database}"')

    def drop_database(self) -> None:
        with psycopg.connect(f"{self.postgres}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    async def spawn(self, node: Node) -> None:
        """Start (or start again) `node`'s process, its output appended to its log file."""
        env = {
            **os.environ,
            "FIELDSYNC_HOST": HOST,
            "FIELDSYNC_PORT": str(node.port),
            "FIELDSYNC_NODE_ID": node.id,
            "FIELDSYNC_NODE_URL": f"http://{HOST}:{node.port + 100}",
            "FIELDSYNC_CLUSTER_LISTEN": f"{HOST}:{node.port + 100}",
            "FIELDSYNC_CLUSTER_SECRET": self.secret,
            "FIELDSYNC_DATABASE_URL": self.database_url,
            "FIELDSYNC_REDIS_URL": self.redis,
            "FIELDSYNC_REDIS_CHANNEL": f"fieldsync:{self.database}",
            "FIELDSYNC_OIDC_ISSUER": self.issuer.issuer,
            "FIELDSYNC_DATA_DIR": str(self.data_dir / "shared"),
            **self.env,
        }
        log = node.log.open("ab")
        self._logs.append(log)
        node.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fieldsync", "serve", env=env, stdout=log, stderr=log
        )
        node.started = time.monotonic()

    async def ready(self, node: Node) -> None:
        """Wait until `node` answers `/v1/ready`; raises if it exits or takes too long."""
        async with aiohttp.ClientSession() as http, asyncio.timeout(_READY_SECONDS):
            while True:
                if not node.alive:
                    raise RuntimeError(f"{node.id} exited; see {node.log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{node.url}/v1/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)

    def kill(self, node: Node) -> None:
        """`kill -9`: no drain, no lease released, nothing flushed."""
        if node.process is not None and node.alive:
            node.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM every live node (they drain), then SIGKILL what is left after a while."""
        live = [node.process for node in self.members if node.process and node.alive]
        for process in live:
            process.terminate()
        for process in live:
            try:
                await asyncio.wait_for(process.wait(), _STOP_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        for node in self.members:
            if node.process is not None:
                await node.process.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()


async def run_cluster(
    *,
    data_dir: Path,
    nodes: int = 3,
    port: int = 8081,
    postgres: str = POSTGRES,
    database: str = "fieldsync_cluster",
    redis: str = REDIS,
    stay: bool = True,
) -> int:
    """Start the cluster, print how to reach it, and keep it running until Ctrl-C (or, without
    `stay`, stop it at once: a check that it starts)."""
    from fieldsync.demo import _dataset

    async with DevIssuer(_dataset.users(), host=HOST, port=port - 1) as issuer:
        cluster = LocalCluster(issuer, data_dir, nodes, port, postgres, database, redis)
        cluster.secret = os.environ.get("FIELDSYNC_CLUSTER_SECRET") or cluster.secret
        try:
            await cluster.start()
            print(f"issuer   {issuer.issuer}  (users: {_dataset.who()})")
            print(f"database {postgres}/{database}, redis {redis}")
            for node in cluster.members:
                print(f"{node.id}   {node.url}  log {node.log}")
            print(f"a token for sam: {issuer.issue('sam')}")
            print(f"a device: fieldsync.client.Client({cluster.sync_urls!r}, token)", flush=True)
            if stay:
                await _until_interrupted(cluster)
        except RuntimeError as exc:
            print(f"fieldsync cluster: {exc}", file=sys.stderr)
            return 2
        finally:
            await cluster.stop()
    return 0


async def _until_interrupted(cluster: LocalCluster) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("running; Ctrl-C stops every node", flush=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        for node in cluster.members:
            if not node.alive and node.process is not None:
                print(f"{node.id} exited ({node.process.returncode}); see {node.log}", flush=True)
                await cluster.spawn(node)  # a local cluster keeps its nodes up
