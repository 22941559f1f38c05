"""Reading an `[adapters.<name>]` table for the ERP kinds: typed keys, `{ env = "NAME" }`
values resolved from the environment, unknown keys refused. Small on purpose: the adapters
file's own loader (`_config.py`) takes this over where it offers the same readers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fieldsync.adapters._base import AdapterConfigError


class Table:
    """One adapter's table, read key by key; `done()` refuses keys nobody asked for."""

    def __init__(self, name: str, table: Mapping[str, Any]) -> None:
        self.name = name
        self._table = table
        self._read: set[str] = {"kind"}

    def _value(self, key: str) -> Any:
        self._read.add(key)
        value = self._table.get(key)
        if isinstance(value, Mapping):
            if set(value) != {"env"} or not isinstance(value["env"], str):
                raise AdapterConfigError(self.name, key, 'a value, or { env = "NAME" }')
            found = os.environ.get(value["env"])
            if found is None:
                raise AdapterConfigError(
                    self.name, key, f"the environment variable {value['env']} is not set"
                )
            return found
        return value

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._value(key)
        if value is None:
            if required:
                raise AdapterConfigError(self.name, key, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise AdapterConfigError(self.name, key, "must be non-empty text")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._value(key)
        if value is None:
            return default
        try:
            found = float(value) if not isinstance(value, bool) else None
        except ValueError:
            found = None
        if found is None or found <= minimum:
            raise AdapterConfigError(self.name, key, f"must be a number above {minimum:g}")
        return found

    def integer(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self._value(key)
        if value is None:
            return default
        try:
            found = int(value) if not isinstance(value, bool | float) else None
        except ValueError:
            found = None
        if found is None or found < minimum:
            raise AdapterConfigError(self.name, key, f"must be a whole number ≥ {minimum}")
        return found

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise AdapterConfigError(self.name, key, "must be true or false")
        return value

    def done(self) -> None:
        unknown = sorted(set(self._table) - self._read)
        if unknown:
            raise AdapterConfigError(self.name, unknown[0], "is not a setting of this kind")
