"""`/metrics` in Prometheus's format: who may scrape it, and that its families move with what
devices do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fieldsync.app import METRICS_ADDRESS
from fieldsync.auth import DevIssuer
from tests.harness import Server, running_server, work_order
from tests.wire import connect

TOKEN = "scrape-token-for-tests"
DASHBOARD = Path(__file__).parents[2] / "ops" / "grafana-dashboard.json"


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"metrics_token": TOKEN}


async def scrape(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("fieldsync_"), family.name
        sample: Sample
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_the_main_listener_wants_the_scrape_token(server: Server, token: str | None) -> None:
    status, body = await scrape(server.url + "/metrics", token)
    assert status == 401
    assert "reauthenticate" in body


async def test_without_a_configured_token_nobody_scrapes_the_main_listener(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    async with running_server(tmp_path, issuer) as server:
        assert (await scrape(server.url + "/metrics", ""))[0] == 401
        assert (await scrape(server.url + "/metrics", "anything"))[0] == 401


async def test_the_families_follow_what_devices_do(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello(platform="ios", version="2.5.0", device_id="pad-1")
        await sam.update("wo:p1", work_order("wo:p1").get_update())
        await sam.control("ack")
        async with connect(server.sync_url, server.token("tina")) as tina:
            await tina.hello(platform="android", version="2.4.1", device_id="phone-1")
            # A technician may not create work orders: refused, counted by its code.
            await tina.update("wo:p2", work_order("wo:p2").get_update())
            await tina.control("error", code="forbidden")
            status, text = await scrape(server.url + "/metrics")
    assert status == 200
    got = samples(text)
    assert got[("fieldsync_sessions", (("platform", "ios"), ("version", "2.5.0")))] == 1
    assert got[("fieldsync_sessions", (("platform", "android"), ("version", "2.4.1")))] == 1
    assert got[("fieldsync_documents_loaded", ())] >= 1
    assert got[("fieldsync_documents", ())] == 1
    assert got[("fieldsync_updates_total", ())] >= 1
    assert got[("fieldsync_updates_refused_total", (("code", "forbidden"),))] == 1
    assert got[("fieldsync_ack_seconds_count", ())] == 1
    assert got[("fieldsync_commit_seconds_count", ())] >= 1
    assert got[("fieldsync_group_commit_writes_sum", ())] >= 1
    assert got[("fieldsync_draining", ())] == 0
    assert got[("fieldsync_jwks_fetches_total", (("outcome", "ok"),))] >= 1


async def test_a_separate_listener_serves_metrics_without_a_token(
    tmp_path: Path, issuer: DevIssuer, server: Server
) -> None:
    """…and a second server in the same process keeps counters of its own."""
    async with running_server(tmp_path / "other", issuer, metrics_listen="127.0.0.1:0") as other:
        async with connect(other.sync_url, other.token("sam")) as sam:
            await sam.hello()
            await sam.update("wo:s1", work_order("wo:s1").get_update())
            await sam.control("ack")
        host, port = other.app[METRICS_ADDRESS]
        status, text = await scrape(f"http://{host}:{port}/metrics", None)
        assert status == 200
        assert samples(text)[("fieldsync_ack_seconds_count", ())] == 1
        # Only /metrics there: the API stays on the main listener.
        assert (await scrape(f"http://{host}:{port}/v1/health", None))[0] == 404
    _, first = await scrape(server.url + "/metrics")
    assert samples(first)[("fieldsync_ack_seconds_count", ())] == 0


async def test_the_grafana_dashboard_uses_only_families_the_server_exports(server: Server) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bfieldsync_[a-z_]+", target["expr"])
    }
    _, text = await scrape(server.url + "/metrics")
    exported = {sample.name for f in text_string_to_metric_families(text) for sample in f.samples}
    # Families with labels have no sample until something happened: they are named in HELP.
    exported |= {
        f"{name}{suffix}"
        for name in re.findall(r"^# HELP (\S+)", text, re.MULTILINE)
        for suffix in ("", "_total")
    }
    assert used
    assert used <= exported, used - exported
