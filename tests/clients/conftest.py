"""The TypeScript client (`clients/ts`, `@fieldsync/client`), built once per test run and run in
Node against a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "clients" / "ts"
BUILT = PACKAGE / "dist" / "index.js"


def _unavailable(reason: str) -> None:
    if os.environ.get("FIELDSYNC_REQUIRE_SERVICES") == "1":
        pytest.fail(f"the TypeScript client needs {reason} (FIELDSYNC_REQUIRE_SERVICES=1)")
    pytest.skip(f"the TypeScript client needs {reason}")


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
    if not (PACKAGE / "node_modules" / "yjs" / "package.json").exists():
        steps.append(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"])
    if steps or _stale():
        steps.append(["npm", "run", "build", "--silent"])
    for step in steps:
        done = subprocess.run(step, cwd=PACKAGE, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(step)} failed in clients/ts:\n{done.stdout}\n{done.stderr}")
    return PACKAGE


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
