from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
from playwright.async_api import Browser, async_playwright

from fieldsync.auth import DevIssuer, DevUser
from fieldsync.logs import JsonFormatter
from fieldsync.replication import V1Session
from tests import contract
from tests.harness import USERS, Issuer, Server, running_issuer, running_server, unavailable

# The server most tests run against: `server`, trusting `issuer`, which signs in `users`. A folder
# or a module that needs other users or settings overrides `users` or `server_settings` (or
# `issuer`, for another kind of OpenID provider), never the server itself.


# Property tests: CI replays the same examples every run (`derandomize`), so a red CI is a
# regression, never a new draw (local runs explore new examples); and no per-example deadline
# anywhere, since speed is measured by the benchmarks, never by timing a test on a shared machine.
hypothesis.settings.register_profile("ci", derandomize=True, deadline=None)
hypothesis.settings.register_profile("dev", deadline=None)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")


# Debian's Chromium: Playwright drives it and never downloads a browser of its own.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium driven by Playwright: the one browser of the browser tests (the
    dashboard's, the TypeScript client's IndexedDB)."""
    if shutil.which(CHROMIUM) is None:  # absent, or not executable
        unavailable(f"the browser tests need {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def users() -> Mapping[str, DevUser]:
    return USERS


@pytest.fixture
async def issuer(users: Mapping[str, DevUser]) -> AsyncIterator[DevIssuer]:
    async with running_issuer(users) as issuer:
        yield issuer


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """Settings beyond the defaults, as keyword arguments of `Settings.load`."""
    return {}


@pytest.fixture
async def server(
    tmp_path: Path, issuer: Issuer, server_settings: dict[str, Any]
) -> AsyncIterator[Server[Any]]:
    async with running_server(tmp_path / "data", issuer, **server_settings) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class _TokenWatch(logging.Handler):
    """Remembers every log line, traceback included, that holds a JWT: an access token's
    header and payload are base64url JSON objects, so both start with `eyJ` (RFC 7515 §7.1)."""

    JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        # Both formats: the JSON one adds the log context (request, session, subject…).
        line = self.format(record) + "\n" + self.json.format(record)
        if self.JWT.search(line):
            self.found.append(f"{record.levelname} {record.name}: {line[:300]}")


@pytest.fixture(autouse=True)
def no_token_in_any_log() -> Iterator[None]:
    """Issue 3: no token ever in a log line, checked over the logs of the whole test run (what
    each test's logging lets through; `tests/test_secrets_in_logs.py` turns everything to DEBUG)."""
    watch = _TokenWatch()
    logging.getLogger().addHandler(watch)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(watch)
    assert watch.found == [], "a token reached the log"


@pytest.fixture(autouse=True)
def control_messages_keep_to_their_schemas(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Issue 5: every control message a `fieldsync.v1` session sends, in any test, is valid
    against its JSON Schema in `openapi/fieldsync.yaml` (checked once the test is over, so that
    the session itself runs as it would)."""
    found: list[str] = []
    send = V1Session.send_control

    def checked(session: V1Session, body: dict[str, Any]) -> None:
        found.extend(contract.server_control_problems(body))
        send(session, body)

    monkeypatch.setattr(V1Session, "send_control", checked)
    yield
    assert found == [], "control messages that break their schema:\n" + "\n".join(found[:20])
