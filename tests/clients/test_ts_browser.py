"""`@fieldsync/client` in headless Chromium, on the browser's own WebSocket and IndexedDB: edits
queued offline survive a page reload and reach the server once the reloaded page is online."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page
from pycrdt import Array, Map, Text

from fieldsync.auth import DevIssuer
from tests.harness import running_server, stored_doc, work_order

DOC = "wo:ts-browser-1"
DATABASE = "fieldsync-tina"  # the IndexedDB database, one per signed-in user (README)
NOTE = "Gate code 4411. "


@asynccontextmanager
async def serving(folder: Path) -> AsyncIterator[str]:
    """The test page's files over HTTP on a free loopback port; yields the page's origin."""
    app = web.Application()
    app.router.add_static("/", folder)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def call(page: Page, method: str, *args: Any) -> Any:
    """`await window.device[method](...args)` in the page (test/browser/page.mjs)."""
    return await page.evaluate(f"(args) => window.device.{method}(...args)", list(args))


@pytest.mark.slow
async def test_indexeddb_keeps_queued_edits_through_a_page_reload(
    ts_browser_page: Path, chromium: Browser, issuer: DevIssuer, tmp_path: Path
) -> None:
    async with (
        serving(ts_browser_page) as origin,
        # The page is not the server's origin: its WebSocket is let in by the allow-list only.
        running_server(tmp_path / "data", issuer, allowed_origins=frozenset({origin})) as server,
    ):
        sam = server.client("sam")
        await sam.start()
        sam.doc(DOC).apply_update(work_order(DOC, assignee="tina").get_update())
        await sam.wait_acked(DOC)
        await sam.close()

        page = await (await chromium.new_context()).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(f"{origin}/index.html")
        # The token is handed to the page as the app's sign-in would: never in a URL.
        token = server.token("tina")
        await call(page, "start", server.sync_url, token, DATABASE)
        await call(page, "waitSynced", DOC)

        # Offline, the technician edits the work order: three edits queued.
        await call(page, "stop")
        await call(page, "edit", DOC, NOTE)
        assert await call(page, "pending") == 3
        await call(page, "flush")
        assert str((await stored_doc(server, DOC)).get("notes", type=Text)) == ""

        # The page is reloaded (the tab is closed, the app updated): only IndexedDB remains.
        await page.reload()
        stored = await call(page, "stored", DATABASE)
        assert stored["pending"] == [DOC] * 3, stored

        # The new page starts on the same database, online: the edits go up, are acknowledged.
        await call(page, "start", server.sync_url, token, DATABASE)
        await call(page, "waitAcked")
        assert await call(page, "pending") == 0
        assert (await call(page, "stored", DATABASE))["pending"] == []

        # The server holds each edit exactly once, and the page shows the same.
        doc = await stored_doc(server, DOC)
        fields = doc.get("fields", type=Map)
        assert str(doc.get("notes", type=Text)) == NOTE
        assert (fields["status"], fields["meter_reading"]) == ("en_route", 1042)
        assert len(doc.get("status_log", type=Array)) == 2  # sam's `assigned`, tina's `en_route`
        assert len(doc.get("meter_readings", type=Array)) == 1
        content = await call(page, "content", DOC)
        assert (content["notes"], content["statusLog"], content["meterReadings"]) == (NOTE, 2, 1)
        await call(page, "stop")
        assert errors == []
