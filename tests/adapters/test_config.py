"""The adapters file: validated at start, errors naming the adapter and the key, values from the
environment that are never quoted back; and the contract suite run on the test kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fieldsync.adapters import (
    KINDS,
    AdapterConfigError,
    AdapterContext,
    Table,
    build_adapters,
    factory_of,
    redact_url,
)
from tests.adapters.contract import AdapterContract
from tests.adapters.recorder import KIND, Recorder


class TestRecorderContract(AdapterContract):
    kind = KIND

    def good_table(self) -> dict[str, Any]:
        return {"doc_types": ["wo", "form"]}

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        return [({"doc_types": "wo"}, "doc_types"), ({"doc_types": [""]}, "doc_types")]


def adapters_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "adapters.toml"
    path.write_text(text)
    return path


def test_a_file_builds_its_adapters_in_order(
    tmp_path: Path, adapter_context: AdapterContext
) -> None:
    path = adapters_file(
        tmp_path,
        f"""
        [adapters.erp]
        kind = "{KIND}"
        max_attempts = 5

        [adapters.projection]
        kind = "{KIND}"
        doc_types = ["wo", "form"]
        """,
    )
    erp, projection = build_adapters(path, adapter_context, {})
    assert isinstance(erp, Recorder)
    assert isinstance(projection, Recorder)
    assert (erp.name, erp.max_attempts, erp.doc_types) == ("erp", 5, frozenset({"wo"}))
    assert (projection.name, projection.max_attempts) == ("projection", 10)
    assert projection.doc_types == {"wo", "form"}


@pytest.mark.parametrize(
    ("text", "adapter", "key", "says"),
    [
        ('[adapters.erp]\nkind = "sap_rfc"', "erp", "kind", "unknown kind 'sap_rfc'"),
        ("[adapters.erp]\nmax_attempts = 3", "erp", "kind", "required"),
        (f'[adapters.erp]\nkind = "{KIND}"\nmax_attempts = 0', "erp", "max_attempts", "at least"),
        (f'[adapters.erp]\nkind = "{KIND}"\nmax_atempts = 3', "erp", "max_atempts", "unknown"),
        (f'[adapters.Bad]\nkind = "{KIND}"', "Bad", None, "lower-case"),
        ('[adapters]\nerp = "x"', "erp", None, "must be a table"),
    ],
)
def test_a_bad_entry_names_the_adapter_and_the_key(
    tmp_path: Path,
    adapter_context: AdapterContext,
    text: str,
    adapter: str,
    key: str | None,
    says: str,
) -> None:
    with pytest.raises(AdapterConfigError) as error:
        build_adapters(adapters_file(tmp_path, text), adapter_context, {})
    assert (error.value.adapter, error.value.key) == (adapter, key)
    assert says in str(error.value)
    assert str(error.value).startswith(f"adapters.{adapter}" + (f".{key}" if key else ""))


def test_a_broken_file_is_refused_with_its_reason(
    tmp_path: Path, adapter_context: AdapterContext
) -> None:
    with pytest.raises(AdapterConfigError, match="not valid TOML"):
        build_adapters(adapters_file(tmp_path, "[adapters.erp"), adapter_context, {})
    with pytest.raises(AdapterConfigError, match="cannot read"):
        build_adapters(tmp_path / "missing.toml", adapter_context, {})


def test_values_come_from_the_environment_and_are_never_quoted_back(
    tmp_path: Path, adapter_context: AdapterContext
) -> None:
    text = f'[adapters.erp]\nkind = "{KIND}"\nmax_attempts = {{ env = "ERP_ATTEMPTS" }}\n'
    path = adapters_file(tmp_path, text)
    (erp,) = build_adapters(path, adapter_context, {"ERP_ATTEMPTS": "4"})
    assert isinstance(erp, Recorder)
    assert erp.max_attempts == 4
    with pytest.raises(AdapterConfigError) as error:
        build_adapters(path, adapter_context, {"ERP_ATTEMPTS": "s3cret-value"})
    assert error.value.key == "max_attempts"
    assert "s3cret-value" not in str(error.value)
    with pytest.raises(AdapterConfigError, match="ERP_ATTEMPTS is not set"):
        build_adapters(path, adapter_context, {})


def test_the_typed_readers() -> None:
    environ = {"ERP_URL": "postgresql://erp:hunter2@db.example:5432/erp"}
    table = Table(
        "erp",
        {
            "url": {"env": "ERP_URL"},
            "timeout": 2.5,
            "verify": True,
            "mode": "upsert",
            "mapping": {"number": "AUFNR", "typo": 1},
            "token": "t0ken",
        },
        environ,
    )
    assert table.url("url", ["postgresql"]) == environ["ERP_URL"]
    assert table.number("timeout", minimum=0.1) == 2.5
    assert table.flag("verify") is True
    assert table.choice("mode", ["insert", "upsert"]) == "upsert"
    assert table.secret("token") == "t0ken"
    assert table.integer("batch", 100) == 100  # absent: the default
    mapping = table.table("mapping")
    assert table.table("defaults", optional=True).keys() == []
    assert mapping.text("number") == "AUFNR"
    with pytest.raises(AdapterConfigError) as error:
        table.finish()  # `mapping.typo` was never read
    assert error.value.key == "mapping.typo"
    with pytest.raises(AdapterConfigError) as error:
        table.url("url", ["https"])
    assert "hunter2" not in str(error.value)
    assert error.value.key == "url"
    with pytest.raises(AdapterConfigError, match="one of insert, append"):
        table.choice("mode", ["insert", "append"])


def test_every_shipped_kind_has_its_factory() -> None:
    for kind in KINDS:
        assert callable(factory_of(kind)), kind


def test_a_url_is_shown_without_its_password() -> None:
    assert redact_url("postgresql://erp:hunter2@db:5432/erp") == "postgresql://erp:***@db:5432/erp"
    assert redact_url("https://erp.example/api") == "https://erp.example/api"


def test_serve_with_a_bad_adapters_file_stops_naming_the_adapter_and_key(tmp_path: Path) -> None:
    path = adapters_file(tmp_path, '[adapters.erp]\nkind = "sap_rfc"\n')
    result = subprocess.run(
        [sys.executable, "-m", "fieldsync", "serve"],
        env={
            "FIELDSYNC_DATA_DIR": str(tmp_path / "data"),
            "FIELDSYNC_OIDC_ISSUER": "http://127.0.0.1:1",
            "FIELDSYNC_ADAPTERS": str(path),
            "PATH": "",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "adapters.erp.kind" in result.stderr
