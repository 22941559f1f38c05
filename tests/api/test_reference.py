"""Reference data over HTTP against a real server: adapters import (admins only), devices get
only the changed fields of the datasets their role may read, a `since` older than the retention
gets 410 `resync_required`, and snapshot plus changes converge on the server's rows."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Map

from fieldsync.app import REFERENCE
from fieldsync.auth import DevIssuer
from fieldsync.client import ReferenceReplica
from fieldsync.storage import ImportResult, SnapshotHead
from tests.harness import Server, running_server, work_order
from tests.wire import connect

PAGE = 50  # the server's `reference_page` here: the default and the maximum `limit`


@pytest.fixture
def server_settings() -> dict[str, Any]:
    # A retention of about a tenth of a millisecond: whatever the test committed before it
    # calls `compact_expired()` is expired, so compaction is driven by the test, not a clock.
    return {
        "reference_retention_days": 1e-9,
        "reference_page": PAGE,
        "reference_import_chunk": 300,
    }


def assets(n: int, **changed: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"AS-{i:05d}", "name": f"Pump {i}", "site": f"site-{i % 7}", **changed}
        for i in range(n)
    ]


async def send(
    server: Server,
    method: str,
    rows: list[Any],
    *,
    dataset: str = "assets",
    subject: str = "ada",
    content_type: str = "application/x-ndjson",
    query: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    headers = {"Authorization": f"Bearer {server.token(subject)}", "Content-Type": content_type}
    url = f"{server.url}/v1/reference/{dataset}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, data=body, headers=headers, params=query or {}) as response,
    ):
        return response.status, await response.json(content_type=None)


async def changes(
    server: Server, since: int, *, subject: str = "tina", dataset: str = "assets", **query: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    url = f"{server.url}/v1/reference/{dataset}/changes"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers=headers, params={"since": str(since), **query}) as response,
    ):
        return response.status, await response.json(content_type=None)


async def stored_rows(server: Server, dataset: str = "assets") -> dict[str, dict[str, Any]]:
    def take(head: SnapshotHead, rows: Iterator[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        return {key: orjson.loads(data) for key, data in rows}

    return await server.app[REFERENCE].store.snapshot(dataset, take)


# --- import, changes, pages ---------------------------------------------------------------------


async def test_devices_get_only_the_fields_that_changed_and_the_keys_deleted(
    server: Server,
) -> None:
    status, created = await send(server, "PUT", assets(5))
    assert status == 200
    assert (created["created"], created["updated"], created["deleted"]) == (5, 0, 0)
    status, first = await changes(server, 0)
    assert status == 200
    assert not first["more"]
    assert first["deleted"] == []
    assert {c["key"]: c["row"] for c in first["changes"]} == {r["id"]: r for r in assets(5)}

    rows = assets(5)
    rows[1]["name"] = "Pump 1 (rebuilt)"
    del rows[2]["site"]
    status, full = await send(server, "PUT", rows[:4])  # AS-00004 is gone
    assert (status, full["updated"], full["deleted"], full["unchanged"]) == (200, 2, 1, 2)
    status, partial = await send(server, "PATCH", [{"id": "AS-00009", "name": "Valve"}])
    assert (status, partial["created"], partial["deleted"]) == (200, 1, 0)

    status, delta = await changes(server, first["next"])
    assert status == 200
    assert delta["since"] == first["next"]
    assert not delta["more"]
    assert delta["deleted"] == ["AS-00004"]
    assert sorted(delta["changes"], key=lambda c: c["key"]) == [
        {"key": "AS-00001", "set": {"name": "Pump 1 (rebuilt)"}},
        {"key": "AS-00002", "set": {}, "unset": ["site"]},
        {"key": "AS-00009", "row": {"id": "AS-00009", "name": "Valve"}},
    ]
    # Nothing changed since: an empty page that ends where it began.
    status, quiet = await changes(server, delta["next"])
    assert (quiet["changes"], quiet["deleted"], quiet["next"]) == ([], [], delta["next"])


async def test_an_import_that_changes_nothing_records_nothing(server: Server) -> None:
    await send(server, "PUT", assets(20))
    _, before = await changes(server, 0)
    status, again = await send(server, "PUT", list(reversed(assets(20))))
    assert (status, again["unchanged"], again["seq"]) == (200, 20, 0)
    _, after = await changes(server, before["next"])
    assert (after["changes"], after["deleted"], after["next"]) == ([], [], before["next"])


async def test_changes_are_paged_with_the_next_since(server: Server) -> None:
    await send(server, "PUT", assets(120))
    seen: dict[str, Any] = {}
    since, pages = 0, []
    while True:
        status, page = await changes(server, since, limit="1000")  # more than the maximum
        assert status == 200
        assert page["since"] == since
        pages.append(len(page["changes"]))
        seen.update((c["key"], c["row"]) for c in page["changes"])
        since = page["next"]
        if not page["more"]:
            break
    assert pages == [PAGE, PAGE, 20]
    assert seen == {row["id"]: row for row in assets(120)}
    status, small = await changes(server, 0, limit="7")
    assert (status, len(small["changes"]), small["more"]) == (200, 7, True)
    for bad in ({"limit": "0"}, {"limit": "x"}):
        assert (await changes(server, 0, **bad))[1]["code"] == "invalid_request"
    assert (await changes(server, -1))[1]["code"] == "invalid_request"


async def test_a_bad_row_stops_the_import_and_says_how_far_it_got(server: Server) -> None:
    await send(server, "PUT", assets(700))
    rows: list[Any] = [*assets(650, site="moved"), {"name": "no id"}]
    status, problem = await send(server, "PUT", rows)
    assert (status, problem["code"]) == (400, "invalid_request")
    assert "row 651" in problem["detail"]
    # Two chunks of 300 were committed; the third (with the bad row) and the deletions not.
    assert (problem["applied"]["rows"], problem["applied"]["updated"]) == (600, 600)
    stored = await stored_rows(server)
    assert len(stored) == 700
    assert sum(row["site"] == "moved" for row in stored.values()) == 600
    status, problem = await send(server, "PATCH", ["not an object"])
    assert (status, problem["code"]) == (400, "invalid_request")
    async with (
        aiohttp.ClientSession() as http,
        http.patch(
            server.url + "/v1/reference/assets",
            data=b'{"id": "x"}\n{"id": \n',
            headers={
                "Authorization": f"Bearer {server.token('ada')}",
                "Content-Type": "application/x-ndjson",
            },
        ) as response,
    ):
        assert response.status == 400
        assert "row 2: not JSON" in (await response.json())["detail"]


async def test_a_full_import_cut_off_in_transit_deletes_nothing(server: Server) -> None:
    await send(server, "PUT", assets(700))

    async def moved() -> int:
        return sum(row["site"] == "moved" for row in (await stored_rows(server)).values())

    async def cut_off() -> AsyncIterator[bytes]:
        yield b"".join(orjson.dumps(row) + b"\n" for row in assets(400, site="moved"))
        # The link drops once the server has committed the first chunk (300 rows) and holds
        # the next 100 rows, waiting for the rest of that chunk.
        while await moved() < 300:  # noqa: ASYNC110 - a commit has no event to wait on
            await asyncio.sleep(0.01)
        raise ConnectionAbortedError("the adapter's link dropped")

    headers = {
        "Authorization": f"Bearer {server.token('ada')}",
        "Content-Type": "application/x-ndjson",
    }
    async with aiohttp.ClientSession() as http:
        with pytest.raises((aiohttp.ClientError, ConnectionAbortedError)):
            await http.put(server.url + "/v1/reference/assets", data=cut_off(), headers=headers)
    # Imports into a dataset take turns: once this one is through, the cut one has ended.
    assert (await send(server, "PATCH", []))[0] == 200
    assert len(await stored_rows(server)) == 700  # nothing deleted
    assert await moved() == 300  # and the rows of the chunk cut short not applied


@pytest.mark.parametrize(
    ("dataset", "content_type", "query"),
    [
        ("Assets", "application/x-ndjson", {}),  # names are lower case
        ("assets", "application/json", {}),
        ("assets", "application/x-ndjson", {"key": ""}),
    ],
)
async def test_imports_are_refused_what_they_cannot_read(
    server: Server, dataset: str, content_type: str, query: dict[str, str]
) -> None:
    status, problem = await send(
        server, "PUT", assets(1), dataset=dataset, content_type=content_type, query=query
    )
    assert (status, problem["code"]) == (400, "invalid_request")


async def test_rows_are_keyed_by_the_field_named(server: Server) -> None:
    status, result = await send(
        server, "PUT", [{"part_no": 4711, "name": "Seal"}], dataset="parts", query={"key": "no"}
    )
    assert (status, "row 1" in result["detail"]) == (400, True)
    status, result = await send(
        server,
        "PUT",
        [{"part_no": 4711, "name": "Seal"}],
        dataset="parts",
        query={"key": "part_no"},
    )
    assert (status, result["created"]) == (200, 1)
    _, page = await changes(server, 0, dataset="parts")
    assert page["changes"] == [{"key": "4711", "row": {"part_no": 4711, "name": "Seal"}}]


# --- who may read and write ---------------------------------------------------------------------


@pytest.fixture
async def parts_only(tmp_path: Path, issuer: DevIssuer) -> AsyncIterator[Server]:
    """Technicians may read the parts catalogue only (the shipped policy also gives assets)."""
    shipped = (Path(__file__).parents[2] / "fieldsync/auth/policy.toml").read_text()
    technician, rest = shipped.split("[roles.supervisor]", 1)
    narrowed = technician.replace('datasets = ["assets", "parts"]', 'datasets = ["parts"]')
    assert narrowed != technician
    policy = tmp_path / "policy.toml"
    policy.write_text(narrowed + "[roles.supervisor]" + rest)
    async with running_server(tmp_path / "data", issuer, policy=str(policy)) as server:
        yield server


async def test_devices_read_only_the_datasets_of_their_role(parts_only: Server) -> None:
    server = parts_only
    for dataset in ("assets", "parts", "secret"):
        assert (await send(server, "PUT", assets(3), dataset=dataset))[0] == 200
    expected = {
        ("tina", "parts"): 200,
        ("tina", "assets"): 403,
        ("sam", "assets"): 200,
        ("ada", "assets"): 200,
        ("nobody", "parts"): 403,  # no role, no datasets
        # Not in the policy: refused to everyone, exactly as a name that does not exist.
        ("ada", "secret"): 403,
        ("tina", "nowhere"): 403,
    }
    for (subject, dataset), status in expected.items():
        for what in ("changes?since=0", "snapshot"):
            url = f"{server.url}/v1/reference/{dataset}/{what}"
            headers = {"Authorization": f"Bearer {server.token(subject)}"}
            async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
                body = await r.read()
                assert (subject, dataset, what, r.status) == (subject, dataset, what, status)
                if status == 403:
                    assert orjson.loads(body)["code"] == "forbidden"
    async with aiohttp.ClientSession() as http:
        url = f"{server.url}/v1/reference/parts/changes"
        async with http.get(url) as anonymous:
            assert anonymous.status == 401


@pytest.mark.parametrize("subject", ["tina", "sam", "mia", "nobody"])
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_only_admins_import(server: Server, subject: str, method: str) -> None:
    status, problem = await send(server, method, assets(1), subject=subject)
    assert (status, problem["code"]) == (403, "forbidden")
    assert await stored_rows(server) == {}


# --- retention, resync, snapshots ---------------------------------------------------------------


async def snapshot(server: Server, coding: str, **headers: str) -> aiohttp.ClientResponse:
    headers["Accept-Encoding"] = coding
    headers["Authorization"] = f"Bearer {server.token('tina')}"
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        response = await http.get(server.url + "/v1/reference/assets/snapshot", headers=headers)
        await response.read()
        return response


def decoded(response: aiohttp.ClientResponse, body: bytes) -> list[dict[str, Any]]:
    coding = response.headers.get("Content-Encoding")
    if coding == "zstd":
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    elif coding == "gzip":
        body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
    elif coding == "br":
        body = brotli.decompress(body)
    else:
        assert coding is None
    return [orjson.loads(line) for line in body.splitlines()]


async def test_past_the_retention_devices_resync_from_the_snapshot(server: Server) -> None:
    await send(server, "PUT", assets(200))
    async with aiohttp.ClientSession() as http:
        device = ReferenceReplica("assets")
        first = await device.sync(http, server.url, server.token("tina"))
        assert (first.snapshots, first.pages) == (1, 1)  # a new device starts from the snapshot
        was = device.since
        assert was is not None
        await send(server, "PUT", assets(180, site="moved"))
        horizons = await server.app[REFERENCE].compact_expired()
        assert horizons["assets"] > was

        status, problem = await changes(server, was)
        assert (status, problem["code"], problem["status"]) == (410, "resync_required", 410)
        assert problem["horizon"] == horizons["assets"]
        assert problem["snapshot"] == "/v1/reference/assets/snapshot"

        # The same device, back after the retention: the snapshot, then the changes after it.
        await send(server, "PATCH", [{"id": "AS-00000", "name": "After the snapshot"}])
        again = await device.sync(http, server.url, server.token("tina"), limit=7)
        assert again.snapshots == 1
        assert device.rows == await stored_rows(server)
        assert device.rows["AS-00000"]["name"] == "After the snapshot"
        assert len(device.rows) == 180


async def test_the_snapshot_is_compressed_as_accepted_and_consistent_at_its_seq(
    server: Server,
) -> None:
    await send(server, "PUT", assets(300))
    by_coding = {}
    for coding in ("zstd", "gzip", "br", "br;q=0, gzip;q=0.5, zstd;q=0.1", "identity"):
        response = await snapshot(server, coding)
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Vary"] == "Accept-Encoding"
        by_coding[coding] = (response.headers.get("Content-Encoding"), decoded(response, body))
    assert [enc for enc, _ in by_coding.values()] == ["zstd", "gzip", "br", "gzip", None]
    lines = by_coding["zstd"][1]
    assert all(lines == other for _, other in by_coding.values())
    header, rows = lines[0], lines[1:]
    assert (header["dataset"], header["rows"]) == ("assets", 300)
    assert [line["key"] for line in rows] == sorted(row["id"] for row in assets(300))
    assert {line["key"]: line["row"] for line in rows} == await stored_rows(server)
    # Consistent at its seq: the changes after it are exactly what happened after it.
    await send(server, "PATCH", [{"id": "AS-00007", "name": "Seven", "site": "site-0"}])
    _, page = await changes(server, header["seq"])
    assert page["changes"] == [{"key": "AS-00007", "set": {"name": "Seven"}}]


async def test_an_unchanged_snapshot_revalidates_to_304(server: Server) -> None:
    await send(server, "PUT", assets(10))
    first = await snapshot(server, "zstd")
    etag = first.headers["ETag"]
    again = await snapshot(server, "zstd", **{"If-None-Match": etag})
    assert again.status == 304
    await send(server, "PATCH", [{"id": "AS-00001", "name": "changed"}])
    changed = await snapshot(server, "zstd", **{"If-None-Match": etag})
    assert changed.status == 200
    assert changed.headers["ETag"] != etag


# --- imports do not hold up devices -------------------------------------------------------------


async def test_device_updates_are_acknowledged_while_an_import_runs(server: Server) -> None:
    """A 30,000-row import in 100 commits, and a device that edits and waits for each ack
    meanwhile: acks keep coming between the import's chunks, not after the import."""
    reports: list[ImportResult] = []
    started = asyncio.Event()

    def progress(result: ImportResult) -> None:
        reports.append(result)
        started.set()

    importing = asyncio.create_task(
        server.app[REFERENCE].store.import_rows(
            "assets", assets(30_000), full=True, progress=progress
        )
    )
    doc = work_order("wo:busy")
    fields = doc.get("fields", type=Map)
    chunks_at_ack: list[int] = []
    async with connect(server.sync_url, server.token("sam")) as wire:
        await wire.hello()
        await wire.update("wo:busy", doc.get_update())
        await wire.control("ack")
        await started.wait()
        edit = 0
        while not importing.done():
            state = doc.get_state()
            fields["title"] = f"edit {edit}"
            edit += 1
            await wire.update("wo:busy", doc.get_update(state))
            await wire.control("ack")
            if not importing.done():
                chunks_at_ack.append(len(reports))
    result = await importing
    assert (result.created, result.done) == (30_000, True)
    # Acks arrived while the import was under way, and the import moved on between them.
    assert len(chunks_at_ack) >= 3
    assert len(set(chunks_at_ack)) >= 2
    assert chunks_at_ack[0] < len(reports) - 1


# --- the property, end to end -------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(6)]
values = st.one_of(st.integers(0, 2), st.sampled_from(["a", "b"]), st.none())
rows_strategy = st.lists(
    st.tuples(
        st.sampled_from(KEYS), st.dictionaries(st.sampled_from(["x", "y", "z"]), values, max_size=3)
    ),
    max_size=6,
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("PUT"), rows_strategy),
        st.tuples(st.just("PATCH"), rows_strategy),
        st.tuples(st.just("sync"), st.integers(1, 3)),
        st.tuples(st.just("compact"), st.none()),
    ),
    max_size=8,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=operations)
async def test_a_device_replica_ends_with_the_servers_rows(
    server: Server, ops: list[tuple[str, Any]]
) -> None:
    # The server lives across examples; every example starts its device from whatever the
    # dataset holds, as a device installed at any moment would.
    async with aiohttp.ClientSession() as http:
        device = ReferenceReplica("assets")
        await device.sync(http, server.url, server.token("tina"))
        for op, argument in ops:
            if op in ("PUT", "PATCH"):
                rows = [{"id": key, **fields} for key, fields in argument]
                assert (await send(server, op, rows))[0] == 200
            elif op == "sync":
                await device.sync(http, server.url, server.token("tina"), limit=argument)
            else:
                await server.app[REFERENCE].compact_expired()
        await device.sync(http, server.url, server.token("tina"), limit=2)
        assert device.rows == await stored_rows(server)
