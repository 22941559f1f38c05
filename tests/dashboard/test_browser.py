"""The dashboard in a real browser: headless Chromium (Debian's, never a downloaded one) driven by
Playwright, against a real server and the development issuer's login page.

Screenshots of every page are kept under `FIELDSYNC_TEST_ARTEFACTS` (default: the system's temp
folder, `fieldsync-artefacts/dashboard`); with `FIELDSYNC_SCREENSHOTS=docs/screenshots` the
supervisor's and the manager's pages are also written there for the README.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pycrdt import Array, Map

from fieldsync import documents
from fieldsync.app import ENDPOINTS
from fieldsync.auth import DevIssuer
from fieldsync.client import Client
from fieldsync.errors import CloseCode
from fieldsync.replication import Control, DocMessage, decode_frame
from tests.harness import USERS, Server, eventually, running_server, unavailable

pytestmark = pytest.mark.slow

TOKEN_TTL = 8  # seconds: the dashboard renews twice or more while the test runs
TIMEOUT = 15_000  # milliseconds a page may take to show what a test waits for

playwright_api = pytest.importorskip("playwright.async_api")


def _require_browser() -> None:
    built = Path(__file__).resolve().parents[2] / "fieldsync" / "api" / "dashboard" / "app.js"
    if built.exists():
        return
    unavailable("the browser tests need the built dashboard (make dashboard)")


def artefacts() -> Path:
    root = os.environ.get("FIELDSYNC_TEST_ARTEFACTS")
    folder = Path(root) if root else Path(tempfile.gettempdir()) / "fieldsync-artefacts"
    folder = folder / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def readme_screenshots() -> Path | None:
    target = os.environ.get("FIELDSYNC_SCREENSHOTS")
    if not target:
        return None
    Path(target).mkdir(parents=True, exist_ok=True)
    return Path(target)


async def screenshot(page: Any, name: str, *, readme: bool = False) -> None:
    await page.screenshot(path=str(artefacts() / f"{name}.png"), full_page=True)
    folder = readme_screenshots() if readme else None
    if folder is not None:
        await page.screenshot(path=str(folder / f"{name}.png"))


@pytest.fixture
async def issuer() -> AsyncIterator[DevIssuer]:
    async with DevIssuer(USERS, token_ttl=TOKEN_TTL) as issuer:
        yield issuer


@pytest.fixture
async def server(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server[DevIssuer]]:
    async with running_server(tmp_path / "data", issuer) as server:
        yield server


@pytest.fixture
def browser(chromium: Any) -> Any:
    _require_browser()
    return chromium


class Dashboard:
    """One signed-in user's tab, every control message its socket received, and the documents
    whose messages it received."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.sockets = 0
        self.received: list[dict[str, Any]] = []
        self.docs: set[str] = set()
        self.refreshes = 0
        page.on("websocket", self._socket)
        page.on("requestfinished", self._request)

    def _socket(self, ws: Any) -> None:
        self.sockets += 1
        ws.on("framereceived", self._frame)

    def _frame(self, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else payload.encode("latin-1")
        for message in decode_frame(data, max_frame=1 << 30, max_body=1 << 30):
            if isinstance(message, Control):
                self.received.append(message.body)
            elif isinstance(message, DocMessage):
                self.docs.add(message.doc)

    def _request(self, request: Any) -> None:
        if request.url.endswith("/v1/auth/token") and "refresh_token" in (request.post_data or ""):
            self.refreshes += 1

    def card(self, doc_id: str) -> Any:
        return self.page.locator(f'.cards li[data-id="{doc_id}"]')

    def connection(self) -> Any:
        return self.page.locator("#connection")


async def sign_in(browser: Any, server: Server[DevIssuer], user: str) -> Dashboard:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT)
    dashboard = Dashboard(page)
    await page.goto(f"{server.url}/dashboard/")
    await page.get_by_role("button", name="Sign in").click()
    # The provider's login page, then back to the dashboard with a code.
    await page.get_by_label("User").fill(user)
    await page.get_by_label("Password").fill("demo")
    await page.get_by_role("button", name="Sign in").click()
    expect = playwright_api.expect
    await expect(dashboard.connection()).to_have_text("Live")
    assert "code=" not in page.url  # the code left the address bar
    return dashboard


async def create(server: Server[DevIssuer], subject: str, doc_id: str, **fields: Any) -> None:
    body = {
        "id": doc_id,
        "fields": {"title": f"Pump {doc_id}", "number": doc_id[3:], **fields},
        "checklist": [{"label": "Check seals", "required": True}],
    }
    await post(server, subject, "/v1/work-orders", body, 201)


async def post(
    server: Server[DevIssuer], subject: str, path: str, body: Any, status: int = 200
) -> None:
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + path, json=body, headers=headers) as answer,
    ):
        assert answer.status == status, await answer.text()


async def technician(server: Server[DevIssuer], subject: str) -> Client:
    async def token() -> str:
        return server.token(subject)

    device = Client(server.sync_url, token)
    await device.start()
    return device


def move(doc: Any, *statuses: str, by: str = "tina") -> None:
    for status in statuses:
        documents.work_order.set_status(doc, status, by=by, role="technician")


def tick(doc: Any, by: str = "tina") -> None:
    item = doc.get("checklist", type=Array)[0]
    assert isinstance(item, Map)
    with doc.transaction():
        item["done"] = True
        item["done_by"] = by
        item["done_at"] = "2026-12-06T10:00:00Z"


async def test_the_supervisors_dashboard_follows_the_field_live(
    server: Server[DevIssuer], browser: Any
) -> None:
    expect = playwright_api.expect
    await create(server, "sam", "wo:101", assignee="tina", due_at="2020-01-01")
    await create(server, "sam", "wo:102", assignee="tom")
    await create(server, "sam", "wo:103", assignee="tina")
    await create(server, "sue", "wo:901", assignee="ulla")

    sam = await sign_in(browser, server, "sam")
    sue = await sign_in(browser, server, "sue")
    for doc_id in ("wo:101", "wo:102", "wo:103"):
        await expect(sam.card(doc_id)).to_be_visible()
    await expect(sam.card("wo:101")).to_contain_text("Overdue")
    await expect(sue.card("wo:901")).to_be_visible()
    await expect(sam.page.locator('[role=tab][data-status="assigned"] .count')).to_have_text("3")
    await screenshot(sam.page, "supervisor", readme=True)

    # A technician's device completes a work order: its card moves to the completed tab.
    tina = await technician(server, "tina")
    try:
        doc = tina.doc("wo:101")
        await tina.wait_synced("wo:101")
        tick(doc)
        move(doc, "en_route", "in_progress", "completed")
        await tina.wait_acked("wo:101")
        await expect(sam.card("wo:101")).to_have_attribute("data-status", "completed")
        await sam.page.locator('[role=tab][data-status="completed"]').click()
        await expect(sam.card("wo:101")).to_be_visible()
        await expect(sam.card("wo:103")).to_be_hidden()
        await sam.page.locator('[role=tab][data-status=""]').click()

        # Moved to another team (an admin's act): gone from sam's queue at once, in sue's.
        await post(
            server,
            "ada",
            "/v1/work-orders/wo:102/reassign",
            {"assignee": "ulla", "team": "south", "region": "west"},
        )
        await expect(sam.card("wo:102")).to_have_count(0)
        await expect(sue.card("wo:102")).to_be_visible()

        # A work order's live detail: the checklist moves as the technician works.
        await sam.page.locator('.cards li[data-id="wo:103"] a').click()
        await expect(sam.page.locator("dd[data-field=status]")).to_have_text("assigned")
        await screenshot(sam.page, "work-order")
        other = tina.doc("wo:103")
        await tina.wait_synced("wo:103")
        tick(other)
        move(other, "en_route")
        await expect(sam.page.locator(".checklist li").first).to_have_attribute("data-done", "true")
        await expect(sam.page.locator("dd[data-field=status]")).to_have_text("en_route")

        # Reassign through the page (REST, the device write path): the detail follows.
        await sam.page.get_by_label("Reassign to").fill("tom")
        await sam.page.get_by_role("button", name="Reassign").click()
        await expect(sam.page.locator("dd[data-field=assignee]")).to_have_text("tom")

        # The socket drops: the page says so, reconnects, and the view catches up.
        await sam.page.locator('nav a[href="#/queue"]').click()
        sam.sockets = 0
        await expect(sam.card("wo:103")).to_be_visible()
        for conn in list(server.app[ENDPOINTS].connections):
            if conn.principal.subject == "sam":
                conn.close_soon(CloseCode.GOING_AWAY, "test")
        await expect(sam.connection()).to_have_text("Reconnecting…")
        await create(server, "sam", "wo:104", assignee="tina")
        await expect(sam.connection()).to_have_text("Live")
        await expect(sam.card("wo:104")).to_be_visible()
        reconnected = sam.sockets
        assert reconnected >= 1

        # Devices and conflicts of the team.
        await sam.page.get_by_role("link", name="Devices").click()
        await expect(sam.page.locator("tbody tr").first).to_be_visible()
        await screenshot(sam.page, "devices")
        await sam.page.get_by_role("link", name="Conflicts").click()
        await expect(sam.page.get_by_role("heading", name="Conflicts")).to_be_visible()
        await screenshot(sam.page, "conflicts")

        # The token expires every few seconds: renewals keep the same socket, and the view.
        await eventually(lambda: sam.refreshes >= 2, timeout=4 * TOKEN_TTL)
        await sam.page.locator('nav a[href="#/queue"]').click()
        await expect(sam.card("wo:104")).to_be_visible()
        await create(server, "sam", "wo:105", assignee="tom")
        await expect(sam.card("wo:105")).to_be_visible()
        assert sam.sockets == reconnected, "a renewal must not reconnect"
        await expect(sam.connection()).to_have_text("Live")
        # The page follows views and the work order it opened, not the team's every document.
        assert sam.docs == {"wo:103"}
    finally:
        await tina.close()

    # Sue never saw sam's team's work orders: not in her page, not in a frame she received.
    for doc_id in ("wo:101", "wo:103", "wo:104", "wo:105"):
        await expect(sue.card(doc_id)).to_have_count(0)
        assert doc_id not in orjson.dumps(sue.received).decode()
    await screenshot(sue.page, "supervisor-south")


async def test_the_managers_metrics_and_the_admins_dead_letters(
    server: Server[DevIssuer], browser: Any
) -> None:
    expect = playwright_api.expect
    await create(server, "sam", "wo:201", assignee="tina", due_at="2020-01-01")
    await create(server, "sam", "wo:202", assignee="tom")
    mia = await sign_in(browser, server, "mia")
    await expect(mia.page.get_by_role("heading", name="Region metrics")).to_be_visible()
    north = mia.page.locator('tr[data-id="north"] td')
    await expect(north.nth(1)).to_have_text("2")
    await expect(north.nth(2)).to_have_text("1")
    await expect(mia.page.locator("svg.chart").first).to_be_visible()
    # Work moves in the field: the metrics follow without a reload.
    await create(server, "sam", "wo:203", assignee="tina")
    await create(server, "mia", "wo:301", assignee="ulla", team="south", region="east")
    await expect(north.nth(1)).to_have_text("3")
    tina = await technician(server, "tina")
    try:
        doc = tina.doc("wo:201")
        await tina.wait_synced("wo:201")
        tick(doc)
        move(doc, "en_route", "in_progress", "completed")
        await tina.wait_acked("wo:201")
    finally:
        await tina.close()
    await expect(north.nth(3)).to_have_text("1")  # completed
    await expect(north.nth(2)).to_have_text("0")  # no longer overdue
    await screenshot(mia.page, "manager", readme=True)
    # At a tablet's width the page still reads.
    await mia.page.set_viewport_size({"width": 768, "height": 1024})
    await expect(mia.page.locator("svg.chart").first).to_be_visible()
    await screenshot(mia.page, "manager-tablet")

    ada = await sign_in(browser, server, "ada")
    await ada.page.get_by_role("link", name="Dead letters").click()
    await expect(ada.page.get_by_text("No dead letters.")).to_be_visible()
    await screenshot(ada.page, "admin-outbox")
    # Keyboard: the sign-out button and the pages are reachable with Tab.
    await ada.page.keyboard.press("Tab")
    focused = await ada.page.evaluate("document.activeElement && document.activeElement.tagName")
    assert focused in ("A", "BUTTON")
