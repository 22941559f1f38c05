"""The dashboard's files as the server serves them: the page with its CSP, the script and the
stylesheet, nothing else, and a clear answer while they are not built."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fieldsync.api import DashboardRoutes


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """The routes over a folder the test fills (empty: not built), on a loopback port."""
    app = web.Application()
    folder = tmp_path / "built"
    folder.mkdir()
    (folder / "index.html").write_text('<script type="module" src="app.js"></script>')
    (folder / "app.js").write_text("export {};")
    app.router.add_routes(DashboardRoutes(folder).routes())
    empty = web.Application()
    empty.router.add_routes(DashboardRoutes(tmp_path / "nothing").routes())
    app.add_subapp("/unbuilt", empty)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", folder
    finally:
        await runner.cleanup()


async def test_the_page_carries_a_csp_that_keeps_it_to_this_server(
    serving: tuple[str, Path],
) -> None:
    url, _ = serving
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/dashboard/") as page:
            assert page.status == 200
            assert page.content_type == "text/html"
            csp = page.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp
            assert "connect-src 'self'" in csp
            assert "script-src 'self'" in csp
            assert "unsafe" not in csp
            etag = page.headers["ETag"]
        async with http.get(f"{url}/dashboard/", headers={"If-None-Match": etag}) as again:
            assert again.status == 304
        async with http.get(f"{url}/dashboard/app.js") as script:
            assert (script.status, script.content_type) == (200, "text/javascript")
            assert await script.text() == "export {};"


@pytest.mark.parametrize("name", ["index.html", "style.css", "../fieldsync.db", "app.js.map"])
async def test_nothing_else_is_served(serving: tuple[str, Path], name: str) -> None:
    """The page only at /dashboard/, no file outside the list, none absent from the build."""
    url, _ = serving
    async with aiohttp.ClientSession() as http, http.get(f"{url}/dashboard/{name}") as answer:
        assert answer.status == 404
        if answer.content_type == "application/problem+json":
            assert (await answer.json())["code"] == "not_found"


async def test_an_unbuilt_dashboard_says_how_to_build_it(serving: tuple[str, Path]) -> None:
    url, _ = serving
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/unbuilt/dashboard/") as answer,
    ):
        assert answer.status == 404
        assert "make dashboard" in (await answer.json())["detail"]
