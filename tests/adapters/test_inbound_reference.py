"""`reference_sql` against a real MariaDB legacy database and a real SQLite store: a table or a
query feeds a reference dataset, fully and then incrementally, and `fieldsync reference import`
backfills 10⁵ rows with a progress bar."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fieldsync.adapters import AdapterConfigError, HealthState, Table
from fieldsync.adapters._reference_sql import ReferenceSql, ReferenceSqlConfig
from fieldsync.storage._reference import SQLiteReference
from fieldsync.storage._sqlite import SQLiteStore
from tests.adapters.contract import AdapterContract
from tests.adapters.inbound_databases import foreign_database
from tests.harness import eventually

ROOT = Path(__file__).resolve().parents[2]
ASSETS = """CREATE TABLE assets (
    tag VARCHAR(32) PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    site VARCHAR(64),
    rated_kw DECIMAL(8, 2),
    updated_at DATETIME(6) NOT NULL
)"""


@pytest.fixture
def legacy() -> Iterator[sa.Engine]:
    with foreign_database("mariadb") as url:
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql(ASSETS)
        yield engine
        engine.dispose()


@pytest.fixture
async def reference(tmp_path: Path) -> AsyncIterator[SQLiteReference]:
    store = SQLiteStore(tmp_path / "fieldsync.db")
    await store.open()
    yield SQLiteReference(store, chunk_rows=2)  # small chunks: several commits per import
    await store.close()


def put(conn: sa.Connection, tag: str, name: str, at: str, **values: Any) -> None:
    row = {"tag": tag, "name": name, "site": "Plant 1", "rated_kw": 7.5, **values}
    conn.execute(
        sa.text(
            f"REPLACE INTO assets ({', '.join(row)}, updated_at)"
            f" VALUES ({', '.join(':' + n for n in row)}, :at)"
        ),
        {**row, "at": at},
    )


def make(
    tmp_path: Path, legacy: sa.Engine, reference: SQLiteReference, **keys: Any
) -> ReferenceSql:
    table = {
        "url": legacy.url.render_as_string(hide_password=False),
        "table": "assets",
        "dataset": "assets",
        "key": "tag",
        **keys,
    }
    given = {key: value for key, value in table.items() if value is not None}
    config = ReferenceSqlConfig.from_table(Table("legacy", given, {}))
    return ReferenceSql("legacy", config, reference, tmp_path / "state")


async def dataset(reference: SQLiteReference) -> dict[str, dict[str, Any]]:
    page = await reference.changes("assets", 0, 1000)
    return {change.key: change.fields for change in page.changes}


async def test_a_table_is_imported_whole_then_by_its_changes(
    tmp_path: Path, legacy: sa.Engine, reference: SQLiteReference
) -> None:
    with legacy.begin() as conn:
        for tag in ("P-1", "P-2", "P-3"):
            put(conn, tag, f"Pump {tag}", "2026-11-01 10:00:00")
    adapter = make(tmp_path, legacy, reference, changed_column="updated_at", lookback_s=60)
    try:
        assert await adapter.poll_now()  # no cursor yet: a full import
        rows = await dataset(reference)
        assert sorted(rows) == ["P-1", "P-2", "P-3"]
        assert rows["P-2"] == {
            "tag": "P-2",
            "name": "Pump P-2",
            "site": "Plant 1",
            "rated_kw": 7.5,
            "updated_at": "2026-11-01T10:00:00",
        }
        with legacy.begin() as conn:
            put(conn, "P-2", "Pump P-2 (rebuilt)", "2026-11-01 11:00:00", rated_kw=11)
            put(conn, "P-4", "Pump P-4", "2026-11-01 11:00:00")
            conn.exec_driver_sql("DELETE FROM assets WHERE tag = 'P-3'")
        result = await adapter.import_rows(full=False)
        # The rows changed at or after the cursor (10:00, less a minute) are read; a deletion
        # waits for a full import.
        assert (result.full, result.rows, result.created, result.updated) == (False, 3, 1, 1)
        rows = await dataset(reference)
        assert rows["P-2"]["rated_kw"] == 11
        assert sorted(rows) == ["P-1", "P-2", "P-3", "P-4"]
        result = await adapter.import_rows(full=False)  # from 11:00 less a minute
        assert (result.rows, result.unchanged, result.seq) == (2, 2, 0)
        result = await adapter.import_rows(full=True)
        assert (result.full, result.rows, result.deleted, result.unchanged) == (True, 3, 1, 3)
        assert sorted(await dataset(reference)) == ["P-1", "P-2", "P-4"]
        metrics = adapter.metrics()
        assert (metrics["imports"], metrics["effects"], metrics["errors"]) == (4, 6, 0)
    finally:
        await adapter.stop()


async def test_a_query_feeds_a_dataset_and_an_unreachable_database_keeps_it(
    tmp_path: Path, legacy: sa.Engine, reference: SQLiteReference
) -> None:
    with legacy.begin() as conn:
        put(conn, "M-1", "Motor", "2026-11-01 10:00:00")
    query = "SELECT tag AS id, UPPER(name) AS name FROM assets WHERE site = 'Plant 1'"
    adapter = make(tmp_path, legacy, reference, query=query, key="id", table=None, max_attempts=2)
    try:
        assert await adapter.poll_now()
        assert await dataset(reference) == {"M-1": {"id": "M-1", "name": "MOTOR"}}
        with legacy.begin() as conn:
            conn.exec_driver_sql("RENAME TABLE assets TO assets_moved")
        assert not await adapter.poll_now()
        health = adapter.health()
        assert health.state is HealthState.DEGRADED
        assert "assets" in health.detail
        assert await dataset(reference) == {"M-1": {"id": "M-1", "name": "MOTOR"}}
        assert not await adapter.poll_now()  # max_attempts failed polls in a row: down
        assert adapter.health().state is HealthState.DOWN
        with legacy.begin() as conn:
            conn.exec_driver_sql("RENAME TABLE assets_moved TO assets")
        assert await adapter.poll_now()
        assert adapter.health().state is HealthState.OK
    finally:
        await adapter.stop()


async def test_the_polling_task_imports_until_stopped(
    tmp_path: Path, legacy: sa.Engine, reference: SQLiteReference
) -> None:
    with legacy.begin() as conn:
        put(conn, "K-1", "Compressor", "2026-11-01 10:00:00")
    adapter = make(tmp_path, legacy, reference, interval_s=0.1)
    await adapter.start()
    try:
        await eventually(lambda: adapter.metrics()["imports"] >= 2)
    finally:
        await adapter.stop()
    imports = adapter.metrics()["imports"]
    assert sorted(await dataset(reference)) == ["K-1"]
    assert adapter.metrics()["imports"] == imports  # stopped means stopped


def test_the_configuration_reads_a_table_or_a_query() -> None:
    base = {"url": "mariadb+pymysql://u@db/legacy", "dataset": "parts"}
    config = ReferenceSqlConfig.from_table(Table("parts", {**base, "table": "inv.parts"}))
    assert (config.table, config.key, config.interval_s, config.changed_column) == (
        "inv.parts",
        "id",
        None,
        None,
    )
    query = "SELECT no AS id, text FROM parts;"
    config = ReferenceSqlConfig.from_table(Table("parts", {**base, "query": query}))
    assert (config.table, config.query) == (None, "SELECT no AS id, text FROM parts")
    for wrong, key in (({"query": "DELETE FROM parts"}, "query"), ({}, "table")):
        with pytest.raises(AdapterConfigError) as error:
            ReferenceSqlConfig.from_table(Table("parts", {**base, **wrong}))
        assert error.value.key == key


class TestReferenceSqlContract(AdapterContract):
    kind = "reference_sql"

    @pytest.fixture(autouse=True)
    def _legacy(self, tmp_path: Path) -> None:
        path = tmp_path / "legacy.sqlite"
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE parts (id TEXT PRIMARY KEY, text TEXT)")
        engine.dispose()
        self.url = f"sqlite:///{path}"

    def good_table(self) -> dict[str, Any]:
        return {"url": self.url, "table": "parts", "dataset": "parts", "interval_s": 60}

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"url": "not a url"}, "url"),
            ({"table": "t", "query": "SELECT 1"}, "table"),
            ({"dataset": ""}, "dataset"),
            ({"interval_s": 0}, "interval_s"),
            ({"lookback_s": "long"}, "lookback_s"),
        ]


@pytest.mark.slow
@pytest.mark.timeout(600)  # the import command alone is given 300 s
def test_the_cli_backfills_a_hundred_thousand_rows_with_a_progress_bar(
    tmp_path: Path, legacy: sa.Engine
) -> None:
    with legacy.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO assets (tag, name, site, rated_kw, updated_at)"
            " SELECT CONCAT('A-', seq), CONCAT('Asset ', seq), CONCAT('Plant ', MOD(seq, 40)),"
            " MOD(seq, 500), '2026-11-01 10:00:00' FROM seq_1_to_100000"
        )
    adapters = tmp_path / "adapters.toml"
    adapters.write_text(
        "[adapters.legacy]\n"
        'kind = "reference_sql"\n'
        'url = { env = "LEGACY_URL" }\n'
        'table = "assets"\n'
        'dataset = "assets"\n'
        'key = "tag"\n'
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FIELDSYNC_DATA_DIR": str(tmp_path / "data"),
        "FIELDSYNC_ADAPTERS": str(adapters),
        "LEGACY_URL": legacy.url.render_as_string(hide_password=False),
        "COLUMNS": "120",
    }
    command = [sys.executable, "-m", "fieldsync", "reference", "import", "legacy", "--full"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "100000/100000" in done.stderr
    assert "rows/s" in done.stderr
    assert "assets: 100000 rows read, 100000 created" in done.stdout
    missing = subprocess.run(
        [*command[:-2], "nobody"], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2
    assert "adapters.nobody: not in" in missing.stderr
