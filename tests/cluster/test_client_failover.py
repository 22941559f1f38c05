"""The Python client given every node of a cluster: it connects to one that answers and, when
its node goes away, goes on with another, where its queued edits are acknowledged."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from pycrdt import Map

from fieldsync.app import ENDPOINTS
from fieldsync.client import Client
from tests.harness import running_issuer, running_server, stored_doc, work_order


def refused_url() -> str:
    """A loopback address where nothing listens (a node that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1/sync"


async def test_a_device_moves_to_another_node_when_its_node_goes(tmp_path: Path, url: str) -> None:
    async with running_issuer() as issuer:
        stacks = [contextlib.AsyncExitStack() for _ in range(2)]
        nodes = [
            await stack.enter_async_context(
                running_server(
                    tmp_path / str(n), issuer, database_url=url, feed_poll=0.2, cluster_secret="s"
                )
            )
            for n, stack in enumerate(stacks)
        ]
        sam = Client(
            [refused_url(), *(node.sync_url for node in nodes)],
            issuer.issue("sam"),
            path=tmp_path / "sam.db",
        )
        try:
            await sam.start()
            sam.doc("wo:1").apply_update(work_order("wo:1").get_update())
            await sam.wait_acked("wo:1")
            (serving,) = [n for n, node in enumerate(nodes) if node.app[ENDPOINTS].connections]
            other = nodes[1 - serving]

            await stacks[serving].aclose()  # the node that served sam stops
            sam.doc("wo:1").get("fields", type=Map)["title"] = "Replace the seal"
            await sam.wait_acked("wo:1", timeout=60)
            assert sam.url == other.sync_url
            assert sam.connections >= 2
            stored = await stored_doc(other, "wo:1")
            assert stored.get("fields", type=Map)["title"] == "Replace the seal"
        finally:
            await sam.close()
            for stack in stacks:
                await stack.aclose()
