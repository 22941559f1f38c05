"""The adapters file (`FIELDSYNC_ADAPTERS`): one table per adapter instance,
`[adapters.<name>]`, with its `kind` and that kind's settings, validated at start.

Each kind validates its own table through `Table`'s typed readers, which raise
`AdapterConfigError` naming the adapter and the key, and a key nobody read is refused the same
way (a misspelt setting is an error, not a silent default). A value written `{ env = "NAME" }`
is read from that environment variable, so passwords stay out of the file; such values are
never quoted in an error or a log.

A kind joins by one line in `KINDS` (its factory, imported only when a file names the kind),
or, for tests and plugins, by `register_kind`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fieldsync.adapters._base import Adapter, AdapterConfigError, DocumentWriter
from fieldsync.records import Person
from fieldsync.storage import Directory, Outbox, ReferenceStore, Screens

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "KINDS",
    "AdapterContext",
    "Factory",
    "Table",
    "build_adapter",
    "build_adapters",
    "factory_of",
    "read_file",
    "redact_url",
    "register_kind",
]

DEFAULT_MAX_ATTEMPTS: Final = 10

# A name is part of origins (`adapter:<name>`), outbox entries and metrics keys.
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What a kind's factory is given besides its table: where it may keep files, the store's
    outbox and reference data, and the write path (as a service principal) for inbound kinds;
    `writer` is None where no write path is wired (the CLI's operator commands). The directory
    kind keeps `directory`, and hands everyone in it to `directory_synced` after each sync it
    applied (the server brings the open sessions in line: closed, rescoped). `screens`
    answers what the document index knows (an asset's open work orders)."""

    data_dir: Path
    outbox: Outbox
    reference: ReferenceStore
    writer: DocumentWriter | None = None
    directory: Directory | None = None
    directory_synced: Callable[[Sequence[Person]], Awaitable[None]] | None = None
    screens: Screens | None = None


_MISSING: Final[Any] = object()

# A reader's `default`, given back as it is when the key is absent (None for an optional key).
Default = TypeVar("Default")


class Table:
    """One adapter's table, read by its kind with typed readers: each takes the key, and a
    `default` that makes the key optional. `finish()` refuses the keys left unread."""

    def __init__(
        self,
        adapter: str,
        values: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        path: str = "",
    ) -> None:
        self.adapter = adapter
        self._values = values
        self._environ = os.environ if environ is None else environ
        self._path = path
        self._read: set[str] = set()
        self._children: list[Table] = []

    # --- the readers -------------------------------------------------------------------------

    def text(self, key: str, default: Default = _MISSING, *, empty: bool = False) -> str | Default:
        value, secret = self._get(key, default)
        if value is default:
            return default
        if not isinstance(value, str):
            raise self._wrong(key, "text", value, secret)
        if not empty and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def secret(self, key: str, default: Default = _MISSING) -> str | Default:
        """Text that is never quoted back, wherever it came from (a password, a token)."""
        value, _ = self._get(key, default)
        if value is default:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, "must be non-empty text")
        return value

    def integer(
        self,
        key: str,
        default: Default = _MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | Default:
        value, secret = self._get(key, default)
        if value is default:
            return default
        if secret and isinstance(value, str):
            value = _parse(int, value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer", value, secret)
        self._bounds(key, value, minimum, maximum)
        return value

    def number(
        self,
        key: str,
        default: Default = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float | Default:
        value, secret = self._get(key, default)
        if value is default:
            return default
        if secret and isinstance(value, str):
            value = _parse(float, value)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self._wrong(key, "a number", value, secret)
        self._bounds(key, value, minimum, maximum)
        return float(value)

    def flag(self, key: str, default: Default = _MISSING) -> bool | Default:
        value, secret = self._get(key, default)
        if value is default:
            return default
        if secret and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value, secret)
        return value

    def choice(
        self, key: str, choices: Iterable[str], default: Default = _MISSING
    ) -> str | Default:
        allowed = tuple(choices)
        value, secret = self._get(key, default)
        if value is default:
            return default
        if not isinstance(value, str) or value not in allowed:
            raise self._wrong(key, f"one of {', '.join(allowed)}", value, secret)
        return value

    def texts(self, key: str, default: Default = _MISSING) -> tuple[str, ...] | Default:
        value, secret = self._get(key, default)
        if value is default:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._wrong(key, "a list of non-empty texts", value, secret)
        return tuple(value)

    def url(self, key: str, schemes: Iterable[str], default: Default = _MISSING) -> str | Default:
        """A URL of one of `schemes` (`postgresql+psycopg`, `https`…); it may hold a password,
        so it is never quoted back whole (`redact_url`)."""
        allowed = tuple(schemes)
        value, _ = self._get(key, default)
        if value is default:
            return default
        if not isinstance(value, str):
            raise self.error(key, "must be a URL")
        try:
            parts = urlsplit(value)
        except ValueError:
            raise self.error(key, "is not a URL") from None
        if parts.scheme not in allowed:
            shown = parts.scheme or "none"
            raise self.error(key, f"scheme must be one of {', '.join(allowed)} (got {shown})")
        return value

    def table(self, key: str, *, optional: bool = False) -> Table:
        """A sub-table (`[adapters.<name>.<key>]`), read with the same readers; an `optional`
        one that is absent reads as empty."""
        value, _ = self._get(key, {} if optional else _MISSING)
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        child = Table(self.adapter, value, self._environ, self._where(key))
        self._children.append(child)
        return child

    def max_attempts(self) -> int:
        """`max_attempts`, which every kind has: deliveries (or polls) tried before an entry is
        dead-lettered (or the adapter reports itself down)."""
        return self.integer("max_attempts", DEFAULT_MAX_ATTEMPTS, minimum=1)

    def keys(self) -> list[str]:
        """The keys present (to read a table of free names, such as a field mapping)."""
        return list(self._values)

    # --- checks ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Refuse the keys no reader asked for: a misspelt key must not pass for a default."""
        for child in self._children:
            child.finish()
        unknown = sorted(set(self._values) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown key")

    def error(self, key: str | None, message: str) -> AdapterConfigError:
        return AdapterConfigError(
            self.adapter, self._where(key) if key else self._path or None, message
        )

    # --- inside ------------------------------------------------------------------------------

    def _where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        """The value, and whether it came from the environment (then it is never quoted)."""
        self._read.add(key)
        if key not in self._values:
            if default is _MISSING:
                raise self.error(key, "required")
            return default, False
        value = self._values[key]
        if isinstance(value, dict) and "env" in value:
            if set(value) != {"env"} or not isinstance(value["env"], str):
                raise self.error(key, 'an environment reference is written { env = "NAME" }')
            name = value["env"]
            if name not in self._environ:
                raise self.error(key, f"the environment variable {name} is not set")
            return self._environ[name], True
        return value, False

    def _wrong(self, key: str, expected: str, value: Any, secret: bool) -> AdapterConfigError:
        shown = "its environment variable's value" if secret else repr(value)
        return self.error(key, f"must be {expected} (got {shown})")

    def _bounds(self, key: str, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum} (got {value})")


def _parse(kind: Callable[[str], Any], text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        return text  # reported by the caller as the wrong type, without the value


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`: how a URL may appear in a log or a health
    detail."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        user = parts.username or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "(unreadable URL)"


# --- kinds -------------------------------------------------------------------------------------

Factory = Callable[[str, Table, AdapterContext], Adapter]

# The kinds fieldsync ships: kind -> "module:factory", imported when an adapters file names
# the kind (a kind's client libraries load only where it is used). One line per kind.
KINDS: dict[str, str] = {
    "erp_sql": "fieldsync.adapters._erp_sql:build",
    "erp_http": "fieldsync.adapters._erp_http:build",
    "erp_inbound_sql": "fieldsync.adapters._erp_inbound_sql:erp_inbound_sql",
    "mqtt_alarms": "fieldsync.adapters._mqtt_alarms:mqtt_alarms",
    "opcua_readings": "fieldsync.adapters._opcua_readings:opcua_readings",
    "reference_sql": "fieldsync.adapters._reference_sql:reference_sql",
    "ldap": "fieldsync.adapters._ldap:build",
}

_registered: dict[str, Factory] = {}


def register_kind(kind: str, factory: Factory) -> None:
    """Add a kind beside those of `KINDS` (tests, plugins)."""
    _registered[kind] = factory


def factory_of(kind: str) -> Factory | None:
    if kind in _registered:
        return _registered[kind]
    target = KINDS.get(kind)
    if target is None:
        return None
    module, _, name = target.partition(":")
    factory: Factory = getattr(importlib.import_module(module), name)
    return factory


def _known_kinds() -> list[str]:
    return sorted({*KINDS, *_registered})


# --- the file ----------------------------------------------------------------------------------


def read_file(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Table]:
    """The adapters file's tables by adapter name, checked for shape (not yet by kind)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise AdapterConfigError("*", None, f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AdapterConfigError("*", None, f"{path} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"adapters"})
    if extra:
        raise AdapterConfigError("*", None, f"{path}: unknown top-level key {extra[0]!r}")
    adapters = data.get("adapters", {})
    if not isinstance(adapters, dict):
        raise AdapterConfigError("*", None, f"{path}: `adapters` must be a table of tables")
    tables = {}
    for name, values in adapters.items():
        if not _NAME.fullmatch(name):
            raise AdapterConfigError(
                name, None, "a name is lower-case letters, digits, `_` and `-`, from a letter"
            )
        if not isinstance(values, dict):
            raise AdapterConfigError(name, None, "must be a table ([adapters.<name>])")
        tables[name] = Table(name, values, environ)
    return tables


def build_adapters(
    path: Path, context: AdapterContext, environ: Mapping[str, str] | None = None
) -> list[Adapter]:
    """Every adapter of the file, built and validated by its kind, in the file's order; the
    first bad entry raises `AdapterConfigError` naming the adapter and the key."""
    return [build_adapter(table, context) for table in read_file(path, environ).values()]


def build_adapter(table: Table, context: AdapterContext) -> Adapter:
    """One adapter from its table: its kind's factory validates and builds it; keys left
    unread are refused."""
    kind = table.text("kind")
    table.max_attempts()  # checked for every kind, whether or not it reads it
    factory = factory_of(kind)
    if factory is None:
        known = ", ".join(_known_kinds()) or "none"
        raise table.error("kind", f"unknown kind {kind!r} (known: {known})")
    adapter = factory(table.adapter, table, context)
    table.finish()
    return adapter
