"""`erp_inbound_sql` against a real PostgreSQL ERP table and a real server: released orders
become work orders through the write path, each ERP version applied once however the ERP's
transactions commit, merged with what technicians did offline meanwhile."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from pycrdt import Map, Text

from fieldsync import documents
from fieldsync.adapters import AdapterConfigError, AdapterContext, HealthState, Table
from fieldsync.adapters._erp_inbound_sql import ErpInboundSql, ErpInboundSqlConfig
from fieldsync.app import ADAPTERS, REPLICATOR, STORE
from fieldsync.auth import DevIssuer
from fieldsync.replication import Replicator, ServiceWriter
from fieldsync.storage._outbox import SQLiteOutbox
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.contract import AdapterContract
from tests.adapters.inbound_databases import foreign_database
from tests.harness import Server, eventually, running_server, stored_doc

ORDERS = """CREATE TABLE orders (
    order_no text PRIMARY KEY,
    number text,
    short_text text,
    priority text,
    asset_id text,
    site text,
    team text,
    region text,
    due_at timestamptz,
    status text,
    changed_at timestamptz NOT NULL
)"""
# The ERP names its title column its own way, and its order number is its key: `columns`
# maps both.
COLUMNS = {"title": "short_text", "number": "order_no"}


@pytest.fixture
def erp() -> Iterator[sa.Engine]:
    with foreign_database("postgresql") as url:
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql(ORDERS)
        yield engine
        engine.dispose()


def release(conn: sa.Connection, order_no: str, **values: Any) -> None:
    """An ERP write as ERPs make them: stamped with its transaction's start time (`now()`)."""
    row = {
        "order_no": order_no,
        "number": "unused",
        "short_text": f"Service pump {order_no}",
        "priority": "normal",
        "team": "north",
        "region": "east",
        "status": "released",
        **values,
    }
    names = ", ".join(row)
    conn.execute(
        sa.text(
            f"INSERT INTO orders ({names}, changed_at) VALUES"
            f" ({', '.join(':' + n for n in row)}, now())"
            " ON CONFLICT (order_no) DO UPDATE SET"
            f" {', '.join(f'{n} = excluded.{n}' for n in row)}, changed_at = now()"
        ),
        row,
    )


@pytest.fixture
async def adapter(tmp_path: Path, server: Server, erp: sa.Engine) -> AsyncIterator[ErpInboundSql]:
    adapter = make(tmp_path, server, erp)
    yield adapter
    await adapter.stop()


def make(tmp_path: Path, server: Server, erp: sa.Engine, **keys: Any) -> ErpInboundSql:
    table = {
        "kind": "erp_inbound_sql",
        "url": erp.url.render_as_string(hide_password=False),
        "table": "orders",
        "interval_s": 60,
        "lookback_s": 120,
        "columns": COLUMNS,
        **keys,
    }
    config = ErpInboundSqlConfig.from_table(Table("erp", table, {}))
    return ErpInboundSql("erp", config, ServiceWriter(server.app[REPLICATOR]), tmp_path / "state")


async def titles(server: Server, doc_id: str) -> list[tuple[str, str, str]]:
    history = await server.app[STORE].history(doc_id, "fields.title", None, 100)
    return [(h.actor, str(h.origin), h.change.new) for h in reversed(history)]


async def test_orders_committed_out_of_order_are_each_applied_once(
    server: Server, erp: sa.Engine, adapter: ErpInboundSql
) -> None:
    """A long ERP transaction stamps order A before order B is written, and commits after B was
    read: the look-back window finds A; B, read again, is not applied again."""
    with erp.connect() as long_running:
        long_running.begin()
        release(long_running, "A")  # stamped now, committed later
        with erp.begin() as quick:
            release(quick, "B")
        assert await adapter.poll_now()
        assert await ServiceWriter(server.app[REPLICATOR]).read("wo:erp-A") is None
        long_running.commit()
    assert await adapter.poll_now()
    head = await server.app[STORE].head()
    assert await adapter.poll_now()  # the window reads both again: nothing new
    assert await server.app[STORE].head() == head
    for key in ("A", "B"):
        assert await titles(server, f"wo:erp-{key}") == [
            ("adapter:erp", "adapter:erp", f"Service pump {key}")
        ]
    doc = await stored_doc(server, "wo:erp-B")
    fields = doc.get("fields", type=Map).to_py()
    assert fields is not None
    assert (fields["status"], fields["erp_ref"], fields["number"], fields["team"]) == (
        "new",
        "B",
        "B",
        "north",
    )

    with erp.begin() as conn:
        release(conn, "B", short_text="Service pump B, urgently", priority="urgent")
    assert await adapter.poll_now()
    assert await adapter.poll_now()
    assert await titles(server, "wo:erp-B") == [
        ("adapter:erp", "adapter:erp", "Service pump B"),
        ("adapter:erp", "adapter:erp", "Service pump B, urgently"),
    ]
    metrics = adapter.metrics()
    assert (metrics["effects"], metrics["errors"], metrics["failed"]) == (3, 0, 0)
    assert adapter.health().state is HealthState.OK


async def test_an_order_not_released_waits_and_a_cancellation_cancels(
    server: Server, erp: sa.Engine, adapter: ErpInboundSql
) -> None:
    with erp.begin() as conn:
        release(conn, "P", status="planned")
    assert await adapter.poll_now()
    writer = ServiceWriter(server.app[REPLICATOR])
    assert await writer.read("wo:erp-P") is None
    with erp.begin() as conn:
        release(conn, "P")
    assert await adapter.poll_now()
    assert ((await writer.read("wo:erp-P")) or {})["fields"]["status"] == "new"
    with erp.begin() as conn:
        release(conn, "P", status="cancelled")
    assert await adapter.poll_now()
    document = await writer.read("wo:erp-P")
    assert document is not None
    assert document["fields"]["status"] == "cancelled"
    assert [(e["status"], e["by"], e["role"]) for e in document["status_log"]] == [
        ("new", "adapter:erp", "service"),
        ("cancelled", "adapter:erp", "service"),
    ]


async def test_an_erp_change_merges_with_a_technicians_offline_edit(
    tmp_path: Path, server: Server, erp: sa.Engine, adapter: ErpInboundSql
) -> None:
    with erp.begin() as conn:
        release(conn, "T1")
    assert await adapter.poll_now()
    # The supervisor assigns it; the technician syncs it, then works offline.
    sam = server.client("sam", path=tmp_path / "sam.db")
    tina = server.client("tina", path=tmp_path / "tina.db")
    try:
        await sam.start()
        await sam.wait_synced("wo:erp-T1")
        theirs = sam.doc("wo:erp-T1")
        theirs.get("fields", type=Map)["assignee"] = "tina"
        documents.work_order.set_status(theirs, "assigned", by="sam", role="supervisor")
        await sam.wait_acked()
        await tina.start()
        await tina.wait_synced("wo:erp-T1")
        await tina.go_offline()
        mine = tina.doc("wo:erp-T1")
        assert mine.get("fields", type=Map)["status"] == "assigned"
        mine.get("notes", type=Text).insert(0, "seal replaced, pump primed")
        documents.work_order.set_status(mine, "en_route", by="tina", role="technician")

        with erp.begin() as conn:
            release(conn, "T1", short_text="Service pump T1 and its motor", priority="high")
        assert await adapter.poll_now()

        await tina.start()
        await tina.wait_acked("wo:erp-T1")

        def merged(doc: Any) -> bool:
            fields = doc.get("fields", type=Map)
            return bool(
                fields["title"] == "Service pump T1 and its motor"
                and fields["status"] == "en_route"
            )

        await eventually(lambda: merged(mine))
        stored = await stored_doc(server, "wo:erp-T1")
        assert merged(stored)
        assert str(stored.get("notes", type=Text)) == "seal replaced, pump primed"
        fields = stored.get("fields", type=Map)
        assert (fields["priority"], fields["assignee"]) == ("high", "tina")
        assert documents.to_json("wo:erp-T1", mine) == documents.to_json("wo:erp-T1", stored)
    finally:
        await tina.close()
        await sam.close()


async def test_a_bad_order_is_retried_then_set_aside_without_holding_the_rest(
    tmp_path: Path, server: Server, erp: sa.Engine
) -> None:
    adapter = make(tmp_path, server, erp, max_attempts=2)
    try:
        with erp.begin() as conn:
            release(conn, "bad/key")  # no work order id can hold a slash
        with erp.begin() as conn:
            release(conn, "G1")
        assert await adapter.poll_now()
        with erp.begin() as conn:
            release(conn, "G2")
        assert await adapter.poll_now()
        assert await adapter.poll_now()
        metrics = adapter.metrics()
        assert (metrics["failed"], metrics["set_aside"], metrics["effects"]) == (2, 1, 2)
        writer = ServiceWriter(server.app[REPLICATOR])
        assert await writer.read("wo:erp-G1") is not None
        assert await writer.read("wo:erp-G2") is not None
        health = adapter.health()
        assert health.state is HealthState.DEGRADED
        assert health.detail.startswith("1 order(s) set aside; latest: bad/key: InvalidDocId")
        # Changed at the ERP, the order is tried afresh at the next poll.
        with erp.begin() as conn:
            conn.exec_driver_sql("UPDATE orders SET priority = 'high', changed_at = now()")
        assert await adapter.poll_now()
        metrics = adapter.metrics()
        assert (metrics["failed"], metrics["set_aside"], metrics["effects"]) == (3, 0, 4)
    finally:
        await adapter.stop()


async def test_an_unreachable_erp_degrades_health_and_keeps_what_was_applied(
    server: Server, erp: sa.Engine, adapter: ErpInboundSql
) -> None:
    with erp.begin() as conn:
        release(conn, "H1")
    assert await adapter.poll_now()
    with erp.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE orders RENAME TO orders_moved")
    assert not await adapter.poll_now()
    health = adapter.health()
    assert health.state is HealthState.DEGRADED
    assert "orders" in health.detail
    assert adapter.metrics()["errors"] == 1
    assert await ServiceWriter(server.app[REPLICATOR]).read("wo:erp-H1") is not None
    with erp.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE orders_moved RENAME TO orders")
    assert await adapter.poll_now()
    assert adapter.health().state is HealthState.OK


async def test_the_polling_task_starts_and_stops_cleanly(
    tmp_path: Path, server: Server, erp: sa.Engine
) -> None:
    adapter = make(tmp_path, server, erp, interval_s=0.1)
    with erp.begin() as conn:
        release(conn, "S1")
    await adapter.start()
    try:
        await eventually(lambda: adapter.metrics()["effects"] == 1)
        with erp.begin() as conn:
            release(conn, "S2")
        await eventually(lambda: adapter.metrics()["effects"] == 2)
    finally:
        await adapter.stop()
    assert adapter.health().state is HealthState.OK
    # Stopped: its state survives a restart, so nothing is applied twice.
    again = make(tmp_path, server, erp)
    try:
        assert await again.poll_now()
        assert (again.metrics()["effects"], again.metrics()["skipped"]) == (0, 2)
    finally:
        await again.stop()


def test_the_configuration_is_checked_key_by_key() -> None:
    base = {"url": "postgresql+psycopg://erp@db/erp", "table": "o"}
    config = ErpInboundSqlConfig.from_table(Table("erp", {**base, "columns": {"title": "ktext"}}))
    assert config.columns["title"] == "ktext"
    assert config.columns["team"] == "team"
    assert (config.key_column, config.lookback_s, config.statuses["released"]) == (
        "order_no",
        300.0,
        "new",
    )
    environ = {"ERP_URL": "postgresql+psycopg://erp:secret@db/erp"}
    table = Table("erp", {**base, "url": {"env": "ERP_URL"}}, environ)
    assert ErpInboundSqlConfig.from_table(table).url.endswith("secret@db/erp")


def _sqlite_orders(path: Path) -> str:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql(ORDERS.replace("timestamptz", "timestamp"))
    engine.dispose()
    return f"sqlite:///{path}"


class TestErpInboundSqlContract(AdapterContract):
    kind = "erp_inbound_sql"

    @pytest.fixture(autouse=True)
    def _erp(self, tmp_path: Path) -> None:
        self.url = _sqlite_orders(tmp_path / "erp.sqlite")

    @pytest.fixture
    def adapter_context(self, tmp_path: Path, sqlite_store: SQLiteStore) -> AdapterContext:
        writer = ServiceWriter(Replicator(sqlite_store))
        return AdapterContext(
            tmp_path, SQLiteOutbox(sqlite_store), SQLiteReference(sqlite_store), writer
        )

    def good_table(self) -> dict[str, Any]:
        return {"url": self.url, "table": "orders", "columns": COLUMNS}

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"url": "not a url"}, "url"),
            ({"url": {"env": "NO_SUCH_VARIABLE"}}, "url"),
            ({"table": ""}, "table"),
            ({"lookback_s": -1}, "lookback_s"),
            ({"interval_s": "often"}, "interval_s"),
            ({"columns": {"colour": "c"}}, "columns.colour"),
            ({"statuses": {"released": "done"}}, "statuses.released"),
        ]

    def test_it_needs_the_write_path(self, tmp_path: Path, sqlite_store: SQLiteStore) -> None:
        context = AdapterContext(
            tmp_path, SQLiteOutbox(sqlite_store), SQLiteReference(sqlite_store)
        )
        with pytest.raises(AdapterConfigError, match="write path"):
            self.build(context, self.good_table())


async def test_the_server_runs_it_from_the_adapters_file(
    tmp_path: Path, issuer: DevIssuer, erp: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wired as operators wire it: the adapters file names it, the server starts it with the
    write path, and its health and figures are in `/v1/ready` and `/v1/metrics`."""
    with erp.begin() as conn:
        release(conn, "W1")
    path = tmp_path / "adapters.toml"
    path.write_text(
        "[adapters.erp]\n"
        'kind = "erp_inbound_sql"\n'
        'url = { env = "FIELDSYNC_TEST_ERP_URL" }\n'
        'table = "orders"\n'
        "interval_s = 0.1\n"
        "[adapters.erp.columns]\n"
        'title = "short_text"\n'
    )
    monkeypatch.setenv("FIELDSYNC_TEST_ERP_URL", erp.url.render_as_string(hide_password=False))
    async with running_server(tmp_path / "data", issuer, adapters=str(path)) as server:
        (adapter,) = server.app[ADAPTERS].adapters
        await eventually(lambda: adapter.metrics()["effects"] == 1)
        assert await titles(server, "wo:erp-W1") == [
            ("adapter:erp", "adapter:erp", "Service pump W1")
        ]
        headers = {"Authorization": f"Bearer {server.token('ada')}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(server.url + "/v1/ready") as response:
                ready = await response.json()
            async with http.get(server.url + "/v1/metrics") as response:
                metrics = await response.json()
        assert ready["adapters"]["erp"]["state"] == "ok"
        assert metrics["adapters"]["erp"]["kind"] == "erp_inbound_sql"
        assert metrics["adapters"]["erp"]["effects"] == 1
    assert (tmp_path / "data" / "adapters" / "erp.sqlite").exists()  # its memory, durable
