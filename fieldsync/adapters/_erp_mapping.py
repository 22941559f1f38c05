"""The projection of a work order into an ERP-style plant-maintenance schema (orders, their
operations, time confirmations and goods issues), as a mapping file describes it
(`erp_mapping.toml` is the shipped one). Shared by `erp_sql` (rows) and `erp_http` (a body).

The projection is a pure function of the document: the same document always gives the same
rows, so a target made equal to the projection of the last delivered state is right whatever
came before. What was posted stays posted: the status log is replayed, and each completion that
a reopen or a cancel undid gives reversal rows beside its confirmations, never fewer rows.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from fieldsync.adapters._config import Table
from fieldsync.documents import work_order_rules

SHIPPED = Path(__file__).with_name("erp_mapping.toml")
STATUSES = work_order_rules.STATUSES


class ColumnType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    TIMESTAMP = "timestamp"


class MappingError(ValueError):
    """A mapping file that cannot be used: the message names the file and the key."""


class ProjectionError(ValueError):
    """A document that the mapping cannot project: `entity` names the row (`table(key, …)`)."""

    def __init__(self, entity: str, message: str) -> None:
        super().__init__(f"{entity}: {message}")
        self.entity = entity
        self.message = message


# Per entity: the document record its rows come from (the prefix of `from = "<record>.<key>"`)
# and the values it computes.
ENTITIES: dict[str, tuple[str, frozenset[str]]] = {
    "order": ("fields", frozenset({"order_id", "seq", "status_code"})),
    "operation": ("item", frozenset({"order_id", "op_id"})),
    "confirmation": (
        "entry",
        frozenset(
            {
                "order_id",
                "entry_id",
                "reversal",
                "technician",
                "started_at",
                "finished_at",
                "minutes",
            }
        ),
    ),
    "goods_issue": ("part", frozenset({"order_id", "line_id", "reversal"})),
}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sources: tuple[str, ...]
    type: ColumnType
    length: int | None = None
    key: bool = False
    required: bool = False


@dataclass(frozen=True, slots=True)
class Entity:
    kind: str  # a key of ENTITIES
    table: str
    columns: tuple[Column, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns if column.key)

    @property
    def order_column(self) -> str:
        """The key column that holds the order's id: a delivery replaces the rows it selects."""
        return next(c.name for c in self.columns if c.key and c.sources == ("order_id",))

    def name_row(self, row: Mapping[str, Any]) -> str:
        """How an error names a row: `pm_confirmation(wo:7, a1b2, false)`."""
        shown = (_shown(row.get(key)) for key in self.keys)
        return f"{self.table}({', '.join(shown)})"


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# A row as the projection gives it: column name → value.
Row = dict[str, Any]
# Per entity kind, its rows.
Projection = dict[str, list[Row]]


@dataclass(frozen=True, slots=True)
class ErpMapping:
    status_codes: Mapping[str, str]
    posting: frozenset[str]  # statuses in which time is confirmed and parts issued
    entities: Mapping[str, Entity]  # by kind, in ENTITIES' order (parents first)

    @classmethod
    def load(cls, path: Path | str = SHIPPED) -> ErpMapping:
        """Read and check a mapping file; raises `MappingError` naming what is wrong."""
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise MappingError(f"{path}: cannot be read: {error}") from None
        return cls.parse(table, str(path))

    @classmethod
    def parse(cls, table: Mapping[str, Any], where: str = "mapping") -> ErpMapping:
        codes = table.get("status_codes")
        if not isinstance(codes, dict) or not all(isinstance(v, str) and v for v in codes.values()):
            raise MappingError(f"{where}: status_codes: a table of status → ERP code (text)")
        missing = [status for status in STATUSES if status not in codes]
        if missing:
            raise MappingError(f"{where}: status_codes: no code for {', '.join(missing)}")
        posting = (table.get("posting") or {}).get("statuses")
        if not isinstance(posting, list) or not all(s in STATUSES for s in posting):
            raise MappingError(
                f"{where}: posting.statuses: a list of statuses ({', '.join(STATUSES)})"
            )
        raw = table.get("entities")
        if not isinstance(raw, dict) or set(raw) != set(ENTITIES):
            raise MappingError(f"{where}: entities: one table for each of {', '.join(ENTITIES)}")
        entities = {
            kind: _entity(kind, raw[kind], f"{where}: entities.{kind}") for kind in ENTITIES
        }
        tables = [entity.table for entity in entities.values()]
        if len(set(tables)) != len(tables):
            raise MappingError(f"{where}: entities: each entity needs a table of its own")
        return cls(dict(codes), frozenset(posting), entities)

    def project(self, doc_id: str, seq: int, document: Mapping[str, Any]) -> Projection:
        """The rows of work order `doc_id` as of change `seq`; raises `ProjectionError` for a
        value that does not fit its column."""
        fields = _mapping(document.get("fields"))
        status = fields.get("status")
        values: Projection = {kind: [] for kind in ENTITIES}
        values["order"].append(
            {
                "record": fields,
                "order_id": doc_id,
                "seq": seq,
                "status_code": self.status_codes.get(status) if isinstance(status, str) else None,
            }
        )
        for position, item in enumerate(_records(document.get("checklist")), start=1):
            op_id = item.get("id")
            values["operation"].append(
                {
                    "record": item,
                    "order_id": doc_id,
                    "op_id": str(position) if op_id is None or op_id == "" else op_id,
                }
            )
        completions, standing = self._completions(document.get("status_log"), status)
        entries = [e for e in _records(document.get("time_entries")) if "rejected" not in e]
        parts = _records(document.get("parts"))
        for kind, records, key, computed in (
            ("confirmation", entries, "entry_id", _time),
            ("goods_issue", parts, "line_id", lambda record: {}),
        ):
            ids = _record_ids(records)
            for completion in range(1, completions + 1):
                suffix = "" if completion == 1 else f"/{completion}"
                reversed_too = completion < completions or not standing
                for record, record_id in zip(records, ids, strict=True):
                    for reversal in (False, True) if reversed_too else (False,):
                        values[kind].append(
                            {
                                "record": record,
                                "order_id": doc_id,
                                key: record_id + suffix,
                                "reversal": reversal,
                                **computed(record),
                            }
                        )
        return {
            kind: [self._row(self.entities[kind], value) for value in found]
            for kind, found in values.items()
        }

    def _completions(self, log: Any, status: Any) -> tuple[int, bool]:
        """How many times the order entered a posting status, by its status log (the entries
        the rules let stand), and whether the last of those still stands."""
        statuses = [
            entry.get("status")
            for entry in _records(log)
            if "rejected" not in entry and isinstance(entry.get("status"), str)
        ]
        if not statuses and isinstance(status, str):
            statuses = [status]  # a document without a log: its status is all there is
        count, standing = 0, False
        for entry in statuses:
            if entry in self.posting:
                count += 0 if standing else 1
                standing = True
            else:
                standing = False
        return count, standing

    def _row(self, entity: Entity, values: Mapping[str, Any]) -> Row:
        record = values["record"]
        prefix = ENTITIES[entity.kind][0] + "."
        row: Row = {}
        raw: dict[str, Any] = {}
        for column in entity.columns:
            raw[column.name] = next(
                (
                    found
                    for found in (
                        record.get(source[len(prefix) :])
                        if source.startswith(prefix)
                        else values.get(source)
                        for source in column.sources
                    )
                    if found is not None
                ),
                None,
            )
        for column in entity.columns:
            try:
                row[column.name] = _convert(column, raw[column.name])
            except ValueError as error:
                raise ProjectionError(entity.name_row(raw), f"{column.name}: {error}") from None
        return row


def read_mapping(table: Table) -> ErpMapping:
    """The adapter's `mapping` key: a mapping file's path, the shipped one by default."""
    path = table.text("mapping", str(SHIPPED))
    try:
        return ErpMapping.load(Path(path))
    except MappingError as error:
        raise table.error("mapping", str(error)) from None


def _entity(kind: str, table: Any, where: str) -> Entity:
    if not isinstance(table, dict) or not isinstance(table.get("table"), str):
        raise MappingError(f"{where}.table: the target table's name (text)")
    columns = table.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise MappingError(f"{where}.columns: a table of column → {{from, type, …}}")
    prefix, offered = ENTITIES[kind]
    found = []
    for name, spec in columns.items():
        here = f"{where}.columns.{name}"
        if not isinstance(spec, dict):
            raise MappingError(f"{here}: {{from = …, type = …}}")
        unknown = set(spec) - {"from", "type", "length", "key", "required"}
        if unknown:
            raise MappingError(f"{here}: unknown keys {', '.join(sorted(unknown))}")
        sources = spec.get("from")
        sources = (sources,) if isinstance(sources, str) else sources
        if not isinstance(sources, list | tuple) or not sources:
            raise MappingError(f"{here}.from: a value's name or a list of them")
        for source in sources:
            if source not in offered and not (
                isinstance(source, str)
                and source.startswith(prefix + ".")
                and source[len(prefix) + 1 :]
            ):
                raise MappingError(
                    f"{here}.from: {source!r} is neither one of {', '.join(sorted(offered))} "
                    f"nor {prefix}.<key>"
                )
        try:
            kind_of = ColumnType(str(spec.get("type")))
        except ValueError:
            raise MappingError(
                f"{here}.type: one of {', '.join(t.value for t in ColumnType)}"
            ) from None
        length = spec.get("length")
        if kind_of is ColumnType.STRING and not (isinstance(length, int) and 0 < length <= 4000):
            raise MappingError(f"{here}.length: a string column needs a length of 1 to 4000")
        if kind_of is not ColumnType.STRING and length is not None:
            raise MappingError(f"{here}.length: only string columns have a length")
        key, required = spec.get("key", False), spec.get("required", False)
        if not isinstance(key, bool) or not isinstance(required, bool):
            raise MappingError(f"{here}: key and required are true or false")
        found.append(Column(name, tuple(sources), kind_of, length, key, required or key))
    entity = Entity(kind, table["table"], tuple(found))
    if not any(c.key and c.sources == ("order_id",) for c in entity.columns):
        raise MappingError(f"{where}.columns: a key column from order_id is needed")
    if kind != "order" and len(entity.keys) < 2:
        raise MappingError(f"{where}.columns: the key needs a column beside order_id")
    return entity


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _records(value: Any) -> list[dict[str, Any]]:
    """The maps of a root array (anything else in it projects to nothing)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _record_ids(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Each record's `id`, else a digest of its content (the same on every replica and in
    every later state of an append-only array, unlike a position); repeats get `-2`, `-3`…"""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for record in records:
        given = record.get("id")
        if given is None or given == "":
            content = {k: v for k, v in record.items() if k != "rejected"}
            given = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
            given = given[:16]
        given = _shown(given)
        seen[given] = seen.get(given, 0) + 1
        ids.append(given if seen[given] == 1 else f"{given}-{seen[given]}")
    return ids


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _time(entry: Mapping[str, Any]) -> dict[str, Any]:
    start, end = _number(entry.get("start")), _number(entry.get("end"))
    minutes = _number(entry.get("minutes"))
    if minutes is None and start is not None and end is not None:
        minutes = (end - start) / 60
    return {
        "technician": entry.get("by"),
        "started_at": start,
        "finished_at": end,
        "minutes": minutes,
    }


def _convert(column: Column, value: Any) -> Any:
    if value is None:
        if column.required:
            raise ValueError("has no value")
        return None
    match column.type:
        case ColumnType.STRING:
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, float) and value.is_integer():
                text = str(int(value))
            elif isinstance(value, str | int | float):
                text = str(value)
            else:
                raise ValueError(f"{type(value).__name__} is not text")
            # A device may type any character; PostgreSQL's text cannot hold NUL, so no target's
            # does (the same rows on every dialect, not an order dead-lettered on one of them).
            text = text.replace("\x00", "")
            assert column.length is not None
            if len(text) > column.length:
                raise ValueError(f"{len(text)} characters do not fit the column's {column.length}")
            return text
        case ColumnType.INTEGER:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{value!r} is not a whole number")
        case ColumnType.NUMBER:
            number = _number(value)
            if number is None:
                raise ValueError(f"{value!r} is not a number")
            return number
        case ColumnType.BOOLEAN:
            if not isinstance(value, bool):
                raise ValueError(f"{value!r} is not true or false")
            return value
        case ColumnType.TIMESTAMP:
            return _timestamp(value)


def _timestamp(value: Any) -> datetime:
    """A moment as naive UTC to the second, the one form all three dialects store alike."""
    seconds = _number(value)
    if seconds is not None:
        try:
            moment = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{value!r} is not a moment in epoch seconds") from None
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date or time") from None
        if len(value) == 10:  # a date: due by the end of that day (README "Due times")
            moment += timedelta(days=1, seconds=-1)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    else:
        raise ValueError(f"{value!r} is not a date or time")
    return moment.astimezone(UTC).replace(tzinfo=None, microsecond=0)
