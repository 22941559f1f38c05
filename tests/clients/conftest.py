"""The TypeScript client (`clients/ts`, `@fieldsync/client`), built once per test run and run in
Node against a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fieldsync.auth import DevIssuer
from tests.harness import Server, unavailable
from tests.interop.conftest import YjsPeer, node, yjs_peer  # noqa: F401 - fixtures used here too

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "clients" / "ts"
BUILT = PACKAGE / "dist" / "index.js"
BROWSER_PAGE = PACKAGE / "test" / "browser"  # index.html, and dist/page.js once bundled


def _unavailable(reason: str) -> None:
    unavailable(f"the TypeScript client needs {reason}")


def _stale() -> bool:
    if not BUILT.exists():
        return True
    built = BUILT.stat().st_mtime
    sources = [*(PACKAGE / "src").glob("*.ts"), PACKAGE / "tsconfig.json", PACKAGE / "package.json"]
    return any(source.stat().st_mtime > built for source in sources)


@pytest.fixture(scope="session")
def ts_client() -> Path:
    """The package folder, installed (`npm ci`) and built (`npm run build`) if it is not yet:
    `make test` does both before the tests run."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("node and npm on PATH")
    steps = []
    installed = PACKAGE / "node_modules" / ".package-lock.json"  # written by npm ci
    lock = PACKAGE / "package-lock.json"
    if not installed.exists() or lock.stat().st_mtime > installed.stat().st_mtime:
        steps.append(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"])
    if steps or _stale():
        steps.append(["npm", "run", "build", "--silent"])
    for step in steps:
        done = subprocess.run(step, cwd=PACKAGE, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(step)} failed in clients/ts:\n{done.stdout}\n{done.stderr}")
    return PACKAGE


@pytest.fixture(scope="session")
def ts_browser_page(ts_client: Path) -> Path:
    """The folder of the browser test page, its module (the built client and yjs) bundled by
    esbuild (`npm run build:browser-test`, a fraction of a second) for this run."""
    step = ["npm", "run", "build:browser-test", "--silent"]
    done = subprocess.run(step, cwd=ts_client, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(step)} failed in clients/ts:\n{done.stdout}\n{done.stderr}")
    return BROWSER_PAGE


async def run_node_tests(package: Path, test_file: str, env: dict[str, str], timeout: float) -> str:
    """`node --test` on one file of `clients/ts/test`; fails the pytest test with Node's report
    when any Node test fails."""
    process = await asyncio.create_subprocess_exec(
        "node",
        "--test",
        "--test-reporter=spec",
        f"test/{test_file}",
        cwd=package,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        pytest.fail(f"node --test {test_file} took over {timeout} s:\n{output.decode()}")
    report = output.decode()
    assert process.returncode == 0, f"node --test {test_file} failed:\n{report}"
    return report


class TsDevice(YjsPeer):
    """One Node process running `@fieldsync/client` (`clients/ts/test/device.mjs`), with its
    documents and queued edits in a file: the same JSON-lines driving as the Yjs peer, with
    many documents (`edit_doc`, `dump_doc` name theirs)."""

    async def start(self) -> None:
        await self.request("start")

    async def stop(self) -> None:
        await self.request("stop")

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await self.request("caught_up", timeout=timeout + 1, ms=int(timeout * 1000))

    async def wait_synced(self, doc_id: str, timeout: float = 30.0) -> None:
        await self.request("synced", timeout=timeout + 1, doc=doc_id, ms=int(timeout * 1000))

    async def edit_doc(self, doc_id: str, ops: list[dict[str, Any]]) -> None:
        await self.request("edit", doc=doc_id, ops=ops)

    async def wait_acked(self, timeout: float = 30.0) -> None:
        await self.request("acked", timeout=timeout + 1, ms=int(timeout * 1000))

    async def state(self) -> dict[str, Any]:
        return await self.request("state")

    async def dump_doc(self, doc_id: str) -> dict[str, Any]:
        return await self.request("dump", doc=doc_id)


TsDeviceFactory = Callable[[Server[DevIssuer], str, Path], Awaitable[TsDevice]]


@pytest.fixture
async def ts_device(ts_client: Path) -> AsyncIterator[TsDeviceFactory]:
    """`await ts_device(server, user, storage_file)` starts a Node device (not yet online)."""
    devices: list[TsDevice] = []

    async def start(server: Server[DevIssuer], user: str, storage: Path) -> TsDevice:
        process = await asyncio.create_subprocess_exec(
            "node",
            str(ts_client / "test" / "device.mjs"),
            user,
            str(storage),
            cwd=ts_client,
            env={**os.environ, **node_env(server)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        device = TsDevice(process, f"ts-device-{len(devices) + 1}")
        devices.append(device)
        return device

    yield start
    await asyncio.gather(*(device.close() for device in devices))


def node_env(server: Server[DevIssuer], short_ttl: int = 4) -> dict[str, str]:
    """What the Node side needs to reach the server and its issuer (`test/helpers.mjs`)."""
    return {
        "FIELDSYNC_SYNC_URL": server.sync_url,
        "FIELDSYNC_TOKEN_URL": server.issuer.issuer + "/token",
        "FIELDSYNC_SHORT_TOKEN": server.token("tina", ttl=short_ttl),
    }
