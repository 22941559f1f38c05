"""The contract every adapter kind passes (DESIGN.md §7): it builds from a valid table, starts,
reports its health, stops; a bad table is refused naming the adapter and the key; a key it
does not know is refused; `max_attempts` is checked.

A kind's tests subclass `AdapterContract` in a `Test…` class and say what a working table and
some broken ones are; a kind whose start needs a service (a database, a broker) brings it up
in `good_table` (a fixture-backed attribute, say) and overrides `adapter_context` when its
factory needs more of the context (a `writer` for inbound kinds):

    class TestErpSqlContract(AdapterContract):
        kind = "erp_sql"

        def good_table(self) -> dict[str, Any]:
            return {"url": "sqlite:///...", "doc_types": ["wo"]}

        def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
            return [({"url": "ftp://x"}, "url")]
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from fieldsync.adapters import (
    Adapter,
    AdapterConfigError,
    AdapterContext,
    HealthState,
    Table,
    build_adapter,
)


class AdapterContract:
    kind: ClassVar[str]
    name: ClassVar[str] = "under_test"

    def good_table(self) -> dict[str, Any]:
        """The settings (without `kind`) of an instance that starts and works here."""
        raise NotImplementedError

    def bad_tables(self) -> list[tuple[dict[str, Any], str]]:
        """Broken settings (without `kind`) and the key each error must name."""
        raise NotImplementedError

    def build(
        self,
        context: AdapterContext,
        values: dict[str, Any],
        environ: dict[str, str] | None = None,
    ) -> Adapter:
        table = Table(self.name, {"kind": self.kind, **values}, environ or {})
        return build_adapter(table, context)

    async def test_it_starts_reports_its_health_and_stops(
        self, adapter_context: AdapterContext
    ) -> None:
        adapter = self.build(adapter_context, self.good_table())
        assert (adapter.name, adapter.kind) == (self.name, self.kind)
        await adapter.start()
        try:
            assert adapter.health().state in (HealthState.OK, HealthState.DEGRADED)
            assert all(isinstance(v, int | float) for v in adapter.metrics().values())
        finally:
            await adapter.stop()

    def test_a_bad_table_names_the_adapter_and_the_key(
        self, adapter_context: AdapterContext
    ) -> None:
        for values, key in self.bad_tables():
            with pytest.raises(AdapterConfigError) as error:
                self.build(adapter_context, {**self.good_table(), **values})
            assert (error.value.adapter, error.value.key) == (self.name, key), values
            assert f"adapters.{self.name}.{key}" in str(error.value)

    def test_an_unknown_key_is_refused(self, adapter_context: AdapterContext) -> None:
        with pytest.raises(AdapterConfigError) as error:
            self.build(adapter_context, {**self.good_table(), "no_such_setting": 1})
        assert error.value.key == "no_such_setting"

    def test_max_attempts_is_checked(self, adapter_context: AdapterContext) -> None:
        for bad in (0, "three"):
            with pytest.raises(AdapterConfigError) as error:
                self.build(adapter_context, {**self.good_table(), "max_attempts": bad})
            assert error.value.key == "max_attempts"
