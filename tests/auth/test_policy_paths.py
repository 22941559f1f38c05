"""The policy's path language (a root, keys and items, `*` for any one of them) and the scope a
write is held to."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldsync.auth import Policy, PolicyError, Principal, Role, path_allowed
from fieldsync.records import DocIndex

POLICY = Policy.load()


@pytest.mark.parametrize(
    ("pattern", "allowed", "refused"),
    [
        ("*", ["notes", "fields.status", "checklist.0.done"], []),
        ("notes", ["notes"], ["notes_x", "fields.notes"]),
        ("fields.*", ["fields.status", "fields.status.x"], ["fields", "notes"]),
        ("fields.status", ["fields.status"], ["fields.statusx", "fields.priority"]),
        (
            "checklist.*.done",
            ["checklist.0.done", "checklist.12.done"],
            ["checklist", "checklist.0", "checklist.0.required", "checklist.0.done_by"],
        ),
    ],
)
def test_a_pattern_covers_the_path_it_names_and_what_is_below(
    pattern: str, allowed: list[str], refused: list[str]
) -> None:
    for path in allowed:
        assert path_allowed(path, [pattern]), path
    for path in refused:
        assert not path_allowed(path, [pattern]), path


@pytest.mark.parametrize("pattern", ["*.done", "checklist..done", "fields.", "fields.st atus"])
def test_a_pattern_that_is_no_path_is_refused(tmp_path: Path, pattern: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[roles.technician]\nscope = "assigned"\n[roles.technician.write]\nwo = ["{pattern}"]\n'
    )
    with pytest.raises(PolicyError, match="is not a path"):
        Policy.load(path)


def principal(role: Role, team: str | None = "north", region: str | None = "east") -> Principal:
    return Principal("u1", frozenset({role}), team=team, region=region)


@pytest.mark.parametrize(
    ("who", "held"),
    [
        (principal(Role.TECHNICIAN), {"assignee": "u1"}),
        (principal(Role.SUPERVISOR), {"team": "north", "region": "east"}),
        (principal(Role.SUPERVISOR, region=None), {"team": "north"}),
        (principal(Role.MANAGER), {"region": "east"}),
        (principal(Role.ADMIN), {}),
    ],
)
def test_a_write_is_held_to_the_scope_of_its_writer(who: Principal, held: dict[str, str]) -> None:
    assert POLICY.held_to(who) == held


def test_a_supervisor_creates_in_its_own_team_and_region_only() -> None:
    sam = principal(Role.SUPERVISOR)
    home = DocIndex("wo:1", "wo", "wo:1", assignee="x", team="north", region="east")
    astray = DocIndex("wo:2", "wo", "wo:2", assignee="x", team="north", region="west")
    assert POLICY.may_create(sam, "wo", home)
    assert not POLICY.may_create(sam, "wo", astray)
    assert POLICY.outside(sam, astray) == ["region"]
    assert POLICY.outside(sam, astray, ["team", "assignee"]) == []
