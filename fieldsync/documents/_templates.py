"""Form templates and the validation of a form's answers against the one it was started with.

A template is a versioned file, `templates/<template id>.v<version>.toml`: a title and a list of
fields (id, type, label, required, options, min/max, unit, visible_if). The file name is the one
place that states a template's id and version, so the two cannot disagree. Templates are loaded
and checked once, at start (`Templates.load`); everything after that is pure.

A form keeps the template version it was started with (`meta.template`, `meta.version`): it is
validated against exactly that version, never the newest one, so a new template version cannot
make forms already filled in the field invalid.

`validate` is the one way to judge answers: a field id → a reason the app can show, for a wrong
type, a value out of range or not among the options, a required visible field left blank, or an
answer to no field of the template. Empty means valid. The same result, under the same keys,
is what the server keeps in the form's `validation` map (`validation_changes`), and a form whose
result is not empty blocks the completion of its work order (`check_form`).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

from pycrdt import Doc, Map

# The `validation` key of a problem with the form as a whole (no template, unknown version).
# Field ids start with a letter, so no field can take it.
FORM_KEY = "_form"

_FILE_NAME = re.compile(r"(?P<id>[a-z0-9][a-z0-9-]{0,63})\.v(?P<version>[1-9][0-9]{0,5})\.toml")
_FIELD_ID = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# `date.fromisoformat` also takes "20240131" and week dates since 3.11; a form date is the
# calendar form only (ISO 8601 extended, as JavaScript's `toISOString().slice(0, 10)` gives).
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class FieldType(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    CHOICE = "choice"
    MULTI_CHOICE = "multi_choice"
    DATE = "date"
    PHOTO = "photo"  # the sha256 of an attachment of the work order
    SIGNATURE = "signature"  # the sha256 of the attachment holding the drawn signature


_CHOICES = (FieldType.CHOICE, FieldType.MULTI_CHOICE)
_NUMERIC = (FieldType.NUMBER, FieldType.INTEGER)
# For text, min/max bound its length in Unicode code points (`len` in Python; a JavaScript app
# counting `.length` sees an emoji as 2 and must count `[...text].length` to agree).
_RANGED = (FieldType.TEXT, *_NUMERIC)
_FIELD_KEYS = frozenset(
    {"id", "type", "label", "required", "options", "min", "max", "unit", "visible_if"}
)
_TEMPLATE_KEYS = frozenset({"title", "fields"})


class TemplateError(Exception):
    """A template file is wrong; the message names the file and, where it can, the field."""

    def __init__(self, file: str, message: str, field: str | None = None) -> None:
        where = f"{file}: field {field!r}" if field else file
        super().__init__(f"form templates: {where}: {message}")
        self.file = file
        self.field = field


_Fail = Callable[[str], TemplateError]


@dataclass(frozen=True, slots=True)
class VisibleIf:
    """The field is shown only while `field` (an earlier field, itself shown) equals `equals`;
    for a multi_choice field, while `equals` is among the selected options."""

    field: str
    equals: str | float | bool


@dataclass(frozen=True, slots=True)
class Field:
    id: str
    type: FieldType
    label: str
    required: bool = False
    options: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    unit: str | None = None
    visible_if: VisibleIf | None = None


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    version: int
    title: str
    fields: tuple[Field, ...]

    def field(self, field_id: str) -> Field | None:
        return next((f for f in self.fields if f.id == field_id), None)

    def __str__(self) -> str:
        return f"{self.id} v{self.version}"


class Templates:
    """Every known template, by (id, version)."""

    def __init__(self, templates: Iterable[Template] = ()) -> None:
        self._by_key: dict[tuple[str, int], Template] = {}
        for template in templates:
            key = (template.id, template.version)
            if key in self._by_key:
                raise TemplateError(f"{template.id}.v{template.version}.toml", "defined twice")
            self._by_key[key] = template

    @classmethod
    def load(cls, folder: Path | None = None) -> Templates:
        """Every `<id>.v<version>.toml` in `folder`, or the shipped templates; raises
        `TemplateError` naming the file (and field) at the first thing wrong."""
        where: Traversable
        if folder is None:
            where = resources.files("fieldsync.documents").joinpath("templates")
        elif not folder.is_dir():
            raise TemplateError(str(folder), "not a folder")
        else:
            where = folder
        loaded = []
        for entry in sorted(where.iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".toml"):
                continue  # a README or an editor's backup sits next to the templates
            match = _FILE_NAME.fullmatch(entry.name)
            if match is None:
                raise TemplateError(
                    entry.name,
                    "a template file is named <template id>.v<version>.toml, "
                    "e.g. pump-inspection.v1.toml (id: lowercase letters, digits and '-')",
                )
            try:
                data = tomllib.loads(entry.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise TemplateError(entry.name, str(exc)) from None
            loaded.append(parse(match["id"], int(match["version"]), data, entry.name))
        if not loaded:
            raise TemplateError(str(where), "no templates (<template id>.v<version>.toml) found")
        return cls(loaded)

    def get(self, template_id: str, version: int) -> Template | None:
        return self._by_key.get((template_id, version))

    def latest(self, template_id: str) -> Template | None:
        """The newest version of a template: the one a new form starts with."""
        versions = [t for (tid, _), t in self._by_key.items() if tid == template_id]
        return max(versions, key=lambda t: t.version, default=None)

    def __iter__(self) -> Iterator[Template]:
        return iter(sorted(self._by_key.values(), key=lambda t: (t.id, t.version)))

    def __len__(self) -> int:
        return len(self._by_key)


# -- Loading --------------------------------------------------------------------------------


def parse(template_id: str, version: int, data: Mapping[str, Any], source: str) -> Template:
    """A template from the parsed content of its file; `source` names the file in errors."""
    unknown = sorted(set(data) - _TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(source, f"unknown key {unknown[0]!r} (expected title, fields)")
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise TemplateError(source, "title must be a non-empty string")
    raw_fields = data.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise TemplateError(source, "fields must be a non-empty list of [[fields]] tables")
    fields: list[Field] = []
    for n, raw in enumerate(raw_fields, start=1):
        fields.append(_parse_field(raw, n, fields, source))
    return Template(template_id, version, title.strip(), tuple(fields))


def _parse_field(raw: Any, n: int, earlier: list[Field], source: str) -> Field:
    if not isinstance(raw, dict):
        raise TemplateError(source, f"fields[{n}] must be a table")
    field_id = raw.get("id")
    if not isinstance(field_id, str) or not _FIELD_ID.fullmatch(field_id):
        raise TemplateError(
            source,
            f"fields[{n}]: id must be a lowercase letter, then letters, digits or '_' "
            f"(got {field_id!r})",
        )

    def fail(message: str) -> TemplateError:
        return TemplateError(source, message, field_id)

    if any(f.id == field_id for f in earlier):
        raise fail("duplicate field id")
    unknown = sorted(set(raw) - _FIELD_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (expected one of {', '.join(sorted(_FIELD_KEYS))})")
    try:
        kind = FieldType(raw.get("type", ""))
    except ValueError:
        raise fail(
            f"unknown type {raw.get('type')!r} (expected one of {', '.join(FieldType)})"
        ) from None
    label = raw.get("label")
    if not isinstance(label, str) or not label.strip():
        raise fail("label must be a non-empty string")
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise fail("required must be true or false")
    options = _parse_options(raw, kind, fail)
    low, high = _parse_bound(raw, "min", kind, fail), _parse_bound(raw, "max", kind, fail)
    if low is not None and high is not None and low > high:
        raise fail(f"min {_show(low)} is greater than max {_show(high)}")
    unit = raw.get("unit")
    if unit is not None and (kind not in _NUMERIC or not isinstance(unit, str) or not unit):
        raise fail("unit is a non-empty string, for number and integer fields only")
    visible_if = _parse_visible_if(raw.get("visible_if"), field_id, earlier, fail)
    return Field(field_id, kind, label.strip(), required, options, low, high, unit, visible_if)


def _parse_options(raw: dict[str, Any], kind: FieldType, fail: _Fail) -> tuple[str, ...]:
    options = raw.get("options")
    if kind not in _CHOICES:
        if options is not None:
            raise fail(f"options are for choice and multi_choice fields, not {kind}")
        return ()
    if (
        not isinstance(options, list)
        or not options
        or not all(isinstance(o, str) and o.strip() for o in options)
    ):
        raise fail(f"a {kind} field needs options: a non-empty list of non-empty strings")
    duplicates = sorted({o for o in options if options.count(o) > 1})
    if duplicates:
        raise fail(f"option {duplicates[0]!r} is listed twice")
    return tuple(options)


def _parse_bound(raw: dict[str, Any], name: str, kind: FieldType, fail: _Fail) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if kind not in _RANGED:
        raise fail(f"{name} is for number, integer and text fields, not {kind}")
    if not _is_number(value):
        raise fail(f"{name} must be a number (got {value!r})")
    if kind is FieldType.TEXT and (not _is_whole(value) or value < 0):
        raise fail(f"{name} of a text field is a length: a whole number, 0 or more")
    if kind is FieldType.INTEGER and not _is_whole(value):
        raise fail(f"{name} of an integer field must be a whole number (got {value!r})")
    return value


def _parse_visible_if(
    raw: Any, field_id: str, earlier: list[Field], fail: _Fail
) -> VisibleIf | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"field", "equals"}:
        raise fail('visible_if must be a table { field = "<field id>", equals = <value> }')
    target_id, equals = raw["field"], raw["equals"]
    if target_id == field_id:
        raise fail("visible_if names the field itself")
    target = next((f for f in earlier if f.id == target_id), None)
    if target is None:
        # Only an earlier field may be named: a form reads top to bottom, and no cycle can form.
        raise fail(f"visible_if names {target_id!r}, which is no field defined before this one")
    if isinstance(equals, bool | str) or _is_number(equals):
        probe = [equals] if target.type is FieldType.MULTI_CHOICE else equals
        reason = _reason(target, probe)
    else:
        reason = "not a string, number or boolean"
    if reason is not None:
        raise fail(f"visible_if equals {equals!r}, which {target_id!r} never holds: {reason}")
    return VisibleIf(target_id, equals)


# -- Validation -----------------------------------------------------------------------------


def validate(template: Template, answers: Mapping[str, Any]) -> dict[str, str]:
    """Per field id, why its answer cannot stand; empty when the answers are valid.

    Reasons, in the template's field order, then answers to no field (sorted by key):
    a required field that is shown and blank (missing, None, "" or only spaces, an empty
    selection) is "required"; an answer of the wrong type, out of range, or not among the
    options gets a sentence saying what is expected. A field hidden by its `visible_if` is
    neither required nor checked: the app does not show it, so nothing about it can be fixed,
    and an answer kept from before it was hidden must not block the work.

    Values are taken as a Yjs document holds them: every number may be a float (3.0 is a
    valid integer), and booleans are never numbers.
    """
    reasons: dict[str, str] = {}
    shown: set[str] = set()
    for field in template.fields:
        if not _visible(field, answers, shown):
            continue
        shown.add(field.id)
        value = answers.get(field.id)
        if _blank(value):
            if field.required:
                reasons[field.id] = "required"
            continue
        reason = _reason(field, value)
        if reason is not None:
            reasons[field.id] = reason
    known = {field.id for field in template.fields}
    for key in sorted(k for k in answers if k not in known):
        reasons[key] = f"not a field of {template}"
    return reasons


def _visible(field: Field, answers: Mapping[str, Any], shown: set[str]) -> bool:
    condition = field.visible_if
    if condition is None:
        return True
    if condition.field not in shown:
        return False  # a field shown only after a hidden one is hidden too
    value, equals = answers.get(condition.field), condition.equals
    if isinstance(value, list):
        return any(_same(v, equals) for v in value)
    return _same(value, equals)


def _same(value: Any, equals: str | float | bool) -> bool:
    # Python's True == 1: a boolean condition matches only a boolean, a number only a number.
    if isinstance(equals, bool) or isinstance(value, bool):
        return value is equals
    if isinstance(equals, str):
        return isinstance(value, str) and value == equals
    return _is_number(value) and bool(value == equals)


def _blank(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _reason(field: Field, value: Any) -> str | None:
    """Why `value` (not blank) cannot be the answer to `field`, or None."""
    match field.type:
        case FieldType.TEXT:
            ok = isinstance(value, str) and _within(len(value), field)
            return None if ok else _text_expected(field)
        case FieldType.NUMBER:
            ok = _is_number(value) and _within(value, field)
            return None if ok else _number_expected(field, "a number")
        case FieldType.INTEGER:
            ok = _is_number(value) and _is_whole(value) and _within(value, field)
            return None if ok else _number_expected(field, "a whole number")
        case FieldType.BOOLEAN:
            return None if isinstance(value, bool) else "must be yes or no"
        case FieldType.CHOICE:
            return None if value in field.options else f"not one of: {', '.join(field.options)}"
        case FieldType.MULTI_CHOICE:
            return _selection_reason(field, value)
        case FieldType.DATE:
            return None if _is_date(value) else "must be a date (YYYY-MM-DD)"
        case FieldType.PHOTO | FieldType.SIGNATURE:
            attachment = isinstance(value, str) and _SHA256.fullmatch(value) is not None
            return None if attachment else f"must be a {field.type} (an attachment's sha256)"


def _selection_reason(field: Field, value: Any) -> str | None:
    choices = ", ".join(field.options)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"must be a selection of: {choices}"
    for n, item in enumerate(value):
        if item not in field.options:
            return f"{item!r} is not one of: {choices}"
        if item in value[:n]:
            return f"{item!r} is selected twice"
    return None


def _within(value: float, field: Field) -> bool:
    return (field.min is None or value >= field.min) and (field.max is None or value <= field.max)


def _text_expected(field: Field) -> str:
    if field.min is not None and field.max is not None:
        return f"must be text of {_show(field.min)} to {_show(field.max)} characters"
    if field.min is not None:
        return f"must be text of at least {_show(field.min)} characters"
    if field.max is not None:
        return f"must be text of at most {_show(field.max)} characters"
    return "must be text"


def _number_expected(field: Field, kind: str) -> str:
    unit = f" {field.unit}" if field.unit else ""
    if field.min is not None and field.max is not None:
        return f"must be {kind} between {_show(field.min)} and {_show(field.max)}{unit}"
    if field.min is not None:
        return f"must be {kind} of at least {_show(field.min)}{unit}"
    if field.max is not None:
        return f"must be {kind} of at most {_show(field.max)}{unit}"
    return f"must be {kind}" + (f" ({field.unit})" if field.unit else "")


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: float) -> bool:
    return isinstance(value, int) or value.is_integer()


def _is_date(value: Any) -> bool:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _show(number: float) -> str:
    return str(int(number)) if _is_whole(number) else str(number)


# -- The form document ----------------------------------------------------------------------


def check_form(doc: Doc[Any], templates: Templates) -> dict[str, str]:
    """What the form document's `validation` map must hold: `validate` against the template
    version named in `meta`, or a `_form` reason when there is none to validate against.

    Not empty means the form blocks the completion of its work order; the work order rules
    give each entry as one reason (`f"{key}: {reason}"`)."""
    template = form_template(doc, templates)
    if isinstance(template, str):
        return {FORM_KEY: template}
    answers = doc.get("answers", type=Map).to_py() or {}
    return validate(template, answers)


def form_template(doc: Doc[Any], templates: Templates) -> Template | str:
    """The template version named in the form's `meta`, or why there is none: a form is
    created only with one (see `documents.creation_problems`)."""
    meta = doc.get("meta", type=Map)
    template_id, version = meta.get("template"), meta.get("version")
    if not isinstance(template_id, str) or not template_id:
        return "no template: meta.template is missing"
    if not _is_number(version) or not _is_whole(version):
        return f"no template version: meta.version is {version!r}, not a number"
    template = templates.get(template_id, int(version))
    if template is None:
        return f"unknown template {template_id} v{_show(version)}"
    return template


class ValidationChanges(NamedTuple):
    """The smallest edit that makes the `validation` map what `check_form` says it must be."""

    to_set: dict[str, str]  # key → reason, for keys absent or holding anything else
    to_delete: list[str]  # keys that must go, sorted

    def __bool__(self) -> bool:
        return bool(self.to_set or self.to_delete)


def validation_changes(doc: Doc[Any], templates: Templates) -> ValidationChanges:
    """What the server must set and delete in the form's `validation` map, and nothing more.

    Pure: reads `doc`, writes nothing. The caller (the replicator, after a merge) writes the
    changes as the server's own origin, in one transaction:

        changes = validation_changes(doc, templates)
        if changes:
            with doc.transaction(origin=...):
                validation = doc.get("validation", type=Map)
                validation.update(changes.to_set)
                for key in changes.to_delete:
                    del validation[key]

    Only differing keys are written, so a correction broadcasts only what changed and two
    servers correcting the same state write the same values. Once applied, `validation_changes`
    finds nothing (falsy), so the correction never triggers another.
    """
    wanted = check_form(doc, templates)
    current = doc.get("validation", type=Map).to_py() or {}
    to_set = {key: reason for key, reason in wanted.items() if current.get(key) != reason}
    to_delete = sorted(key for key in current if key not in wanted)
    return ValidationChanges(to_set, to_delete)
