"""Form templates: loading and its errors, `validate` per field type and visibility, the
`validation` map of a form document, and the properties (deterministic, idempotent, a right
answer never gets a reason)."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from fieldsync import documents
from fieldsync.demo import _dataset
from fieldsync.documents._templates import (
    FORM_KEY,
    Field,
    FieldType,
    Template,
    TemplateError,
    Templates,
    check_form,
    parse,
    validate,
    validation_changes,
)

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SHIPPED = Templates.load()


def one_field(**spec: Any) -> Template:
    return parse("t", 1, {"title": "T", "fields": [{"id": "f", "label": "F", **spec}]}, "t.v1.toml")


def form_doc(answers: dict[str, Any], template: str = "t", version: int = 1) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    documents.form.write(doc, "wo:1", template, version, answers)
    return doc


def apply(doc: Doc[Any], templates: Templates) -> None:
    """What the replicator does with `validation_changes` (as the server's origin)."""
    changes = validation_changes(doc, templates)
    with doc.transaction():
        validation = doc.get("validation", type=Map)
        validation.update(changes.to_set)
        for key in changes.to_delete:
            del validation[key]


# -- The shipped templates ------------------------------------------------------------------


def test_shipped_templates_load() -> None:
    assert [str(t) for t in SHIPPED] == [
        "pump-inspection v1",
        "safety-check v1",
        "safety-check v2",
        "safety-check v3",
    ]
    assert SHIPPED.latest("safety-check") == SHIPPED.get("safety-check", 3)
    assert SHIPPED.latest("nope") is None


def test_safety_check_v2_adds_a_field_and_changes_the_hazard_options() -> None:
    v1, v2 = SHIPPED.get("safety-check", 1), SHIPPED.get("safety-check", 2)
    assert v1 is not None
    assert v2 is not None
    assert {f.id for f in v2.fields} - {f.id for f in v1.fields} == {"signed_by"}
    hazards1, hazards2 = v1.field("hazards"), v2.field("hazards")
    assert hazards1 is not None
    assert hazards2 is not None
    assert "electrical" in hazards1.options
    assert "electrical" not in hazards2.options
    assert "electrical, 400 V" in hazards2.options


def test_a_form_keeps_the_template_version_it_was_started_with() -> None:
    answers = {
        "permit_number": "PTW-7",
        "hazards": "electrical",
        "lockout_tagout": True,
        "ppe_checked": True,
    }
    assert check_form(form_doc(answers, "safety-check", 1), SHIPPED) == {}
    assert check_form(form_doc(answers, "safety-check", 2), SHIPPED) == {
        "hazards": "not one of: rotating equipment, stored pressure, electrical, 400 V, "
        "electrical, high voltage, confined space, working at height, hot surfaces",
        "signed_by": "required",
    }


def test_the_demo_forms_fit_the_template_version_they_start_with() -> None:
    template = SHIPPED.get(_dataset.SAFETY_TEMPLATE, _dataset.SAFETY_VERSION)
    assert template is not None
    for wo in _dataset.work_orders(30, date(2024, 5, 6)):
        started = validate(template, wo.form_answers)
        assert set(started.values()) == {"required"}, started  # only what the technician adds
        filled = {
            **wo.form_answers,
            "lockout_tagout": True,
            "ppe_checked": True,
            "gas_test_ppm": 2.4,
            "signed_by": "tech-1",
        }
        assert validate(template, filled) == {}


# -- validate: one table row per type -------------------------------------------------------

TYPES: list[tuple[dict[str, Any], Any, str | None]] = [
    # text: min/max are a length
    ({"type": "text"}, "anything", None),
    ({"type": "text"}, 12, "must be text"),
    ({"type": "text", "min": 3, "max": 5}, "abc", None),
    ({"type": "text", "min": 3, "max": 5}, "ab", "must be text of 3 to 5 characters"),
    ({"type": "text", "min": 3, "max": 5}, "abcdef", "must be text of 3 to 5 characters"),
    ({"type": "text", "min": 3}, "ab", "must be text of at least 3 characters"),
    ({"type": "text", "max": 2}, "abc", "must be text of at most 2 characters"),
    # number (a Yjs document gives every number back as a float)
    ({"type": "number", "min": 0, "max": 10, "unit": "bar"}, 0, None),
    ({"type": "number", "min": 0, "max": 10, "unit": "bar"}, 10.0, None),
    ({"type": "number", "min": 0, "max": 10, "unit": "bar"}, 7.25, None),
    (
        {"type": "number", "min": 0, "max": 10, "unit": "bar"},
        10.5,
        "must be a number between 0 and 10 bar",
    ),
    (
        {"type": "number", "min": 0, "max": 10, "unit": "bar"},
        "7",
        "must be a number between 0 and 10 bar",
    ),
    ({"type": "number", "min": 0.5}, True, "must be a number of at least 0.5"),
    ({"type": "number", "max": 3, "unit": "mm/s"}, 4, "must be a number of at most 3 mm/s"),
    ({"type": "number"}, float("nan"), "must be a number"),
    ({"type": "number", "unit": "h"}, float("inf"), "must be a number (h)"),
    # integer
    ({"type": "integer", "min": 1, "max": 50}, 3.0, None),
    ({"type": "integer", "min": 1, "max": 50}, 3.5, "must be a whole number between 1 and 50"),
    ({"type": "integer", "min": 1, "max": 50}, 0, "must be a whole number between 1 and 50"),
    ({"type": "integer"}, False, "must be a whole number"),
    # boolean
    ({"type": "boolean"}, False, None),
    ({"type": "boolean"}, 1, "must be yes or no"),
    ({"type": "boolean"}, "yes", "must be yes or no"),
    # choice
    ({"type": "choice", "options": ["ok", "leak", "replaced"]}, "leak", None),
    (
        {"type": "choice", "options": ["ok", "leak", "replaced"]},
        "Leak",
        "not one of: ok, leak, replaced",
    ),
    (
        {"type": "choice", "options": ["ok", "leak", "replaced"]},
        ["ok"],
        "not one of: ok, leak, replaced",
    ),
    # multi_choice
    ({"type": "multi_choice", "options": ["a", "b", "c"]}, ["c", "a"], None),
    ({"type": "multi_choice", "options": ["a", "b", "c"]}, "a", "must be a selection of: a, b, c"),
    (
        {"type": "multi_choice", "options": ["a", "b", "c"]},
        ["a", 1],
        "must be a selection of: a, b, c",
    ),
    (
        {"type": "multi_choice", "options": ["a", "b", "c"]},
        ["a", "d"],
        "'d' is not one of: a, b, c",
    ),
    ({"type": "multi_choice", "options": ["a", "b", "c"]}, ["b", "b"], "'b' is selected twice"),
    # date
    ({"type": "date"}, "2024-02-29", None),
    ({"type": "date"}, "2023-02-29", "must be a date (YYYY-MM-DD)"),
    ({"type": "date"}, "20240229", "must be a date (YYYY-MM-DD)"),
    ({"type": "date"}, "2024-02-29T10:00:00Z", "must be a date (YYYY-MM-DD)"),
    # photo and signature: an attachment's sha256
    ({"type": "photo"}, SHA, None),
    ({"type": "photo"}, SHA.upper(), "must be a photo (an attachment's sha256)"),
    ({"type": "photo"}, "IMG_0001.jpg", "must be a photo (an attachment's sha256)"),
    ({"type": "signature"}, SHA, None),
    ({"type": "signature"}, {"by": "tech-1"}, "must be a signature (an attachment's sha256)"),
]


@pytest.mark.parametrize(("spec", "value", "reason"), TYPES)
def test_validate_by_type(spec: dict[str, Any], value: Any, reason: str | None) -> None:
    expected = {} if reason is None else {"f": reason}
    assert validate(one_field(**spec), {"f": value}) == expected
    # The same once the answer has been through a Yjs document.
    if value == value:  # NaN compares unequal even to itself, and a document keeps it so
        assert check_form(form_doc({"f": value}), Templates([one_field(**spec)])) == expected


@pytest.mark.parametrize("blank", [None, "", "   ", []])
@pytest.mark.parametrize("kind", ["text", "multi_choice"])
def test_a_blank_answer_is_missing(kind: str, blank: Any) -> None:
    spec: dict[str, Any] = {"type": kind, "min": 3} if kind == "text" else {"type": kind}
    if kind == "multi_choice":
        spec["options"] = ["a"]
    assert validate(one_field(**spec, required=True), {"f": blank}) == {"f": "required"}
    assert validate(one_field(**spec), {"f": blank}) == {}


def test_missing_required_answers_and_unknown_keys_in_a_stable_order() -> None:
    template = SHIPPED.get("pump-inspection", 1)
    assert template is not None
    answers = {"zeta": 1, "vibration": 2.0, "alpha": "x", "pump_tag": "P-104"}
    result = validate(template, answers)
    assert list(result.items()) == [
        ("running_hours", "required"),
        ("discharge_pressure", "required"),
        ("bearing_noise", "required"),
        ("seal_condition", "required"),
        ("inspector_signature", "required"),
        ("alpha", "not a field of pump-inspection v1"),
        ("zeta", "not a field of pump-inspection v1"),
    ]


# -- Conditional visibility -----------------------------------------------------------------

VISIBILITY = parse(
    "v",
    1,
    {
        "title": "Visibility",
        "fields": [
            {"id": "seal", "type": "choice", "label": "Seal", "options": ["ok", "leak"]},
            {
                "id": "leak_rate",
                "type": "number",
                "label": "Leak rate",
                "required": True,
                "min": 0,
                "max": 100,
                "unit": "drops/min",
                "visible_if": {"field": "seal", "equals": "leak"},
            },
            {
                "id": "leak_photo",
                "type": "photo",
                "label": "Photo",
                "required": True,
                "visible_if": {"field": "leak_rate", "equals": 100},
            },
            {"id": "isolated", "type": "boolean", "label": "Isolated", "required": True},
            {
                "id": "points",
                "type": "integer",
                "label": "Points",
                "required": True,
                "visible_if": {"field": "isolated", "equals": True},
            },
            {"id": "defects", "type": "multi_choice", "label": "D", "options": ["rust", "crack"]},
            {
                "id": "crack_mm",
                "type": "number",
                "label": "Crack length",
                "required": True,
                "visible_if": {"field": "defects", "equals": "crack"},
            },
        ],
    },
    "v.v1.toml",
)

VISIBLE_ROWS: list[tuple[dict[str, Any], dict[str, str]]] = [
    # Hidden: not required.
    ({"seal": "ok", "isolated": False}, {}),
    ({"isolated": False}, {}),
    # Shown and required.
    ({"seal": "leak", "isolated": False}, {"leak_rate": "required"}),
    ({"isolated": True}, {"points": "required"}),
    ({"isolated": False, "defects": ["rust", "crack"]}, {"crack_mm": "required"}),
    ({"isolated": False, "defects": ["rust"]}, {}),
    # A chain: shown only while the field it depends on is shown and holds the value.
    (
        {"seal": "leak", "leak_rate": 100, "isolated": False},
        {"leak_photo": "required"},
    ),
    ({"seal": "ok", "leak_rate": 100, "isolated": False}, {}),
    # A boolean condition is not met by 1, nor a number condition by True.
    ({"isolated": 1}, {"isolated": "must be yes or no"}),
    (
        {"seal": "leak", "leak_rate": True, "isolated": False},
        {"leak_rate": "must be a number between 0 and 100 drops/min"},
    ),
    # An answer kept in a hidden field is not checked: the app does not show it.
    ({"seal": "ok", "leak_rate": -5, "isolated": False}, {}),
    (
        {"seal": "leak", "leak_rate": -5, "isolated": False},
        {"leak_rate": "must be a number between 0 and 100 drops/min"},
    ),
]


@pytest.mark.parametrize(("answers", "reasons"), VISIBLE_ROWS)
def test_visibility(answers: dict[str, Any], reasons: dict[str, str]) -> None:
    assert validate(VISIBILITY, answers) == reasons


# -- Loading errors -------------------------------------------------------------------------

GOOD_FIELD = 'id = "a"\ntype = "text"\nlabel = "A"\n'

LOAD_ERRORS: list[tuple[str, str, str]] = [
    ("pump.toml", 'title = "T"\n[[fields]]\n' + GOOD_FIELD, "pump.toml: a template file is named"),
    ("Pump.v1.toml", 'title = "T"\n[[fields]]\n' + GOOD_FIELD, "Pump.v1.toml: a template file"),
    ("p.v1.toml", "title = \n", "p.v1.toml: "),  # not TOML
    ("p.v1.toml", 'title = "T"\nfields = []\n', "p.v1.toml: fields must be a non-empty list"),
    ("p.v1.toml", "[[fields]]\n" + GOOD_FIELD, "p.v1.toml: title must be"),
    ("p.v1.toml", 'title = "T"\nowner = "x"\n[[fields]]\n' + GOOD_FIELD, "unknown key 'owner'"),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "a"\ntype = "colour"\nlabel = "A"\n',
        "p.v1.toml: field 'a': unknown type 'colour'",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + "[[fields]]\n" + GOOD_FIELD,
        "p.v1.toml: field 'a': duplicate field id",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "_form"\ntype = "text"\nlabel = "A"\n',
        "p.v1.toml: fields[1]: id must be",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + "requried = true\n",
        "p.v1.toml: field 'a': unknown key 'requried'",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "p"\ntype = "number"\nlabel = "P"\nmin = 10\nmax = 1\n',
        "p.v1.toml: field 'p': min 10 is greater than max 1",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "p"\ntype = "number"\nlabel = "P"\nmax = "10"\n',
        "field 'p': max must be a number",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + "min = -1\n",
        "field 'a': min of a text field is a length",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "n"\ntype = "integer"\nlabel = "N"\nmax = 2.5\n',
        "field 'n': max of an integer field must be a whole number",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "b"\ntype = "boolean"\nlabel = "B"\nmin = 0\n',
        "field 'b': min is for number, integer and text fields, not boolean",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "c"\ntype = "choice"\nlabel = "C"\n',
        "field 'c': a choice field needs options",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "c"\ntype = "choice"\nlabel = "C"\noptions = ["a", "a"]\n',
        "field 'c': option 'a' is listed twice",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + 'options = ["x"]\n',
        "field 'a': options are for choice and multi_choice fields, not text",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + 'unit = "bar"\n',
        "field 'a': unit is a non-empty string, for number and integer fields only",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + "required = 1\n",
        "field 'a': required must be true or false",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + 'visible_if = { field = "ghost", equals = 1 }\n',
        "p.v1.toml: field 'a': visible_if names 'ghost', which is no field defined before",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + 'visible_if = { field = "a", equals = "x" }\n',
        "field 'a': visible_if names the field itself",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + 'visible_if = { field = "b", equals = 1 }\n'
        '[[fields]]\nid = "b"\ntype = "number"\nlabel = "B"\n',
        "field 'a': visible_if names 'b', which is no field defined before this one",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "c"\ntype = "choice"\nlabel = "C"\noptions = ["ok"]\n'
        "[[fields]]\n" + GOOD_FIELD + 'visible_if = { field = "c", equals = "leak" }\n',
        "field 'a': visible_if equals 'leak', which 'c' never holds: not one of: ok",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\nid = "b"\ntype = "boolean"\nlabel = "B"\n'
        "[[fields]]\n" + GOOD_FIELD + 'visible_if = { field = "b", equals = 1 }\n',
        "field 'a': visible_if equals 1, which 'b' never holds: must be yes or no",
    ),
    (
        "p.v1.toml",
        'title = "T"\n[[fields]]\n' + GOOD_FIELD + 'visible_if = { field = "a" }\n',
        "field 'a': visible_if must be a table",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), LOAD_ERRORS)
def test_load_errors_name_the_file_and_field(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    (tmp_path / "fine.v1.toml").write_text('title = "Fine"\n[[fields]]\n' + GOOD_FIELD)
    (tmp_path / name).write_text(text)
    with pytest.raises(TemplateError, match=r"^form templates: ") as caught:
        Templates.load(tmp_path)
    assert message in str(caught.value)


def test_load_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a.v1.toml").write_text('title = "A"\n[[fields]]\n' + GOOD_FIELD)
    (tmp_path / "a.v2.toml").write_text('title = "A, again"\n[[fields]]\n' + GOOD_FIELD)
    (tmp_path / "README.md").write_text("not a template")
    loaded = Templates.load(tmp_path)
    assert [(t.id, t.version, t.title) for t in loaded] == [("a", 1, "A"), ("a", 2, "A, again")]
    assert loaded.get("a", 2) == Template("a", 2, "A, again", (Field("a", FieldType.TEXT, "A"),))


def test_load_an_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="no templates"):
        Templates.load(tmp_path)
    with pytest.raises(TemplateError, match="not a folder"):
        Templates.load(tmp_path / "missing")


# -- The form document ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"wo": "wo:1"}, "no template: meta.template is missing"),
        ({"template": "safety-check"}, "no template version: meta.version is None, not a number"),
        (
            {"template": "safety-check", "version": "1"},
            "no template version: meta.version is '1', not a number",
        ),
        ({"template": "safety-check", "version": 9}, "unknown template safety-check v9"),
        ({"template": "fire-drill", "version": 1}, "unknown template fire-drill v1"),
    ],
)
def test_a_form_without_a_known_template_is_reported_whole(
    meta: dict[str, Any], reason: str
) -> None:
    doc: Doc[Any] = Doc()
    doc.get("meta", type=Map).update(meta)
    doc.get("answers", type=Map).update({"permit_number": "PTW-1"})
    assert check_form(doc, SHIPPED) == {FORM_KEY: reason}


def test_validation_changes_write_only_the_differences() -> None:
    doc = form_doc({"pump_tag": "P", "seal_condition": "dry"}, "pump-inspection", 1)
    doc.get("validation", type=Map).update(
        {
            "pump_tag": "must be text of 2 to 20 characters",  # already right
            "vibration": "an old reason",  # still wrong, another reason now
            "comments": "fixed since",  # no longer wrong
            FORM_KEY: "unknown template pump-inspection v1",  # stale
        }
    )
    before = doc.get_state()
    changes = validation_changes(doc, SHIPPED)
    assert doc.get_state() == before  # it reads, never writes
    assert changes.to_set == {
        "running_hours": "required",
        "discharge_pressure": "required",
        "vibration": "required",
        "bearing_noise": "required",
        "seal_condition": "not one of: ok, leak, replaced",
        "inspector_signature": "required",
    }
    assert changes.to_delete == [FORM_KEY, "comments"]
    apply(doc, SHIPPED)
    assert not validation_changes(doc, SHIPPED)
    assert doc.get("validation", type=Map).to_py() == check_form(doc, SHIPPED)


def test_a_valid_form_with_an_empty_validation_map_needs_no_changes() -> None:
    doc = form_doc(
        {
            "pump_tag": "P-104",
            "running_hours": 1200,
            "discharge_pressure": 6.2,
            "vibration": 2.8,
            "bearing_noise": False,
            "seal_condition": "ok",
            "inspector_signature": SHA,
        },
        "pump-inspection",
        1,
    )
    assert validation_changes(doc, SHIPPED) == ({}, [])


# -- Properties -----------------------------------------------------------------------------

NUMBERS = st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-(10**6), 10**6)
WORDS = st.text("abcdefgh ,", min_size=1, max_size=8).filter(str.strip)
ANYTHING = st.recursive(
    st.none()
    | st.booleans()
    | NUMBERS
    | st.text(max_size=12)
    | st.sampled_from([SHA, "2024-01-31"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def field_specs(draw: st.DrawFn, n: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(FieldType)))
    spec: dict[str, Any] = {"id": f"f{n}", "type": str(kind), "label": f"Field {n}"}
    spec["required"] = draw(st.booleans())
    if kind in (FieldType.CHOICE, FieldType.MULTI_CHOICE):
        spec["options"] = draw(st.lists(WORDS, min_size=1, max_size=4, unique=True))
    if kind in (FieldType.NUMBER, FieldType.INTEGER, FieldType.TEXT):
        whole = kind is not FieldType.NUMBER
        bound = st.integers(0 if kind is FieldType.TEXT else -100, 100) if whole else NUMBERS
        low, high = draw(st.none() | bound), draw(st.none() | bound)
        if low is not None and high is not None and low > high:
            low, high = high, low
        if kind is FieldType.TEXT and high is not None:
            high = max(high, 1)  # a text that can only be "" cannot be answered
        spec |= {k: v for k, v in (("min", low), ("max", high)) if v is not None}
        if kind is not FieldType.TEXT and draw(st.booleans()):
            spec["unit"] = draw(st.sampled_from(["bar", "ppm", "mm/s"]))
    return spec


@st.composite
def templates(draw: st.DrawFn) -> Template:
    specs: list[dict[str, Any]] = []
    for n in range(draw(st.integers(1, 6))):
        spec = draw(field_specs(n))
        linked = draw(st.booleans())
        if specs and linked:
            target = draw(st.sampled_from(specs))
            alone = {k: v for k, v in target.items() if k != "visible_if"}
            target_field = parse("x", 1, {"title": "x", "fields": [alone]}, "x").fields[0]
            equals = draw(right_values(target_field))
            if isinstance(equals, list):
                equals = equals[0]
            spec["visible_if"] = {"field": target["id"], "equals": equals}
        specs.append(spec)
    version = draw(st.integers(1, 3))
    return parse("gen", version, {"title": "Generated", "fields": specs}, f"gen.v{version}.toml")


def right_values(field: Field) -> st.SearchStrategy[Any]:
    """Answers of the right type, within range, not blank."""
    low, high = field.min, field.max
    match field.type:
        case FieldType.TEXT:
            shortest = max(int(low or 0), 1)
            size = st.integers(shortest, int(high) if high is not None else shortest + 20)
            return size.flatmap(
                lambda n: st.text("xyz ", min_size=n, max_size=n).map(lambda s: "q" + s[1:])
            )
        case FieldType.NUMBER:
            return st.floats(low, high, allow_nan=False, allow_infinity=False)
        case FieldType.INTEGER:
            return st.integers(
                int(low) if low is not None else -(10**9), int(high) if high is not None else 10**9
            )
        case FieldType.BOOLEAN:
            return st.booleans()
        case FieldType.CHOICE:
            return st.sampled_from(field.options)
        case FieldType.MULTI_CHOICE:
            return st.lists(st.sampled_from(field.options), min_size=1, unique=True)
        case FieldType.DATE:
            return st.dates().map(lambda d: d.isoformat()).filter(lambda s: len(s) == 10)
        case FieldType.PHOTO | FieldType.SIGNATURE:
            return st.binary(min_size=32, max_size=32).map(bytes.hex)


SHIPPED_LIST = list(SHIPPED)
# By index: a failing example then shows which one, not every template's repr.
ALL_TEMPLATES = st.integers(0, len(SHIPPED_LIST) - 1).map(SHIPPED_LIST.__getitem__) | templates()


@st.composite
def answer_sets(draw: st.DrawFn, template: Template) -> tuple[dict[str, Any], set[str]]:
    """Answers to `template`: per field absent, right or anything; some unknown keys too.
    Also the ids of the fields given a right answer."""
    answers: dict[str, Any] = {}
    right: set[str] = set()
    for field in template.fields:
        how = draw(st.sampled_from(["absent", "right", "anything"]))
        if how == "right":
            answers[field.id] = draw(right_values(field))
            right.add(field.id)
        elif how == "anything":
            answers[field.id] = draw(ANYTHING)
    extra = draw(
        st.dictionaries(st.sampled_from(["zz", "_form", "note", "f9"]), ANYTHING, max_size=2)
    )
    answers |= {k: v for k, v in extra.items() if template.field(k) is None}
    return answers, right


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.data())
def test_validate_is_deterministic(data: st.DataObject) -> None:
    template = data.draw(ALL_TEMPLATES)
    answers, _ = data.draw(answer_sets(template))
    result = validate(template, answers)
    shuffled = dict(data.draw(st.permutations(list(answers.items()))))
    again = validate(template, shuffled)
    assert list(again.items()) == list(result.items())
    assert all(isinstance(r, str) and r for r in result.values())


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.data())
def test_a_right_answer_never_gets_a_reason(data: st.DataObject) -> None:
    template = data.draw(ALL_TEMPLATES)
    answers, right = data.draw(answer_sets(template))
    assert not right & set(validate(template, answers))
    # Nor after a trip through a Yjs document, which keeps every number as a float.
    doc = form_doc(answers, template.id, template.version)
    assert not right & set(check_form(doc, Templates([template])))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.data())
def test_validation_changes_are_minimal_and_idempotent(data: st.DataObject) -> None:
    template = data.draw(ALL_TEMPLATES)
    answers, _ = data.draw(answer_sets(template))
    known = Templates([template])
    version = data.draw(st.sampled_from([template.version, template.version + 7]))
    doc = form_doc(answers, template.id, version)
    wanted = check_form(doc, known)
    # Whatever the map held: some right reasons, some stale or wrong ones, some junk values.
    old_keys = st.sampled_from([*wanted, "f0", "f1", FORM_KEY, "zz"])
    held = data.draw(
        st.dictionaries(old_keys, st.sampled_from([*wanted.values(), "stale"]) | ANYTHING)
    )
    doc.get("validation", type=Map).update(held)
    current = doc.get("validation", type=Map).to_py() or {}

    to_set, to_delete = validation_changes(doc, known)
    assert all(current.get(key) != reason for key, reason in to_set.items())
    assert all(key in current and key not in wanted for key in to_delete)
    assert set(to_set).isdisjoint(to_delete)

    apply(doc, known)
    assert doc.get("validation", type=Map).to_py() == wanted
    assert validation_changes(doc, known) == ({}, [])
