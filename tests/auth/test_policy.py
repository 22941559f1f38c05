"""The access policy: scopes, creation and field-level write rights per role, from TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldsync.auth import Policy, PolicyError, Principal, Role, in_scope
from fieldsync.records import DocIndex, ScopeFilter, ScopeKind

POLICY = Policy.load()


def principal(*roles: Role, team: str | None = "t1", region: str | None = "r1") -> Principal:
    return Principal("u1", frozenset(roles), team=team, region=region)


TECH = principal(Role.TECHNICIAN)
SUPER = principal(Role.SUPERVISOR)
MANAGER = principal(Role.MANAGER)
ADMIN = principal(Role.ADMIN)
NOBODY = principal()

# Work orders, each inside exactly the scopes its letters say: A(ssignee), T(eam), R(egion).
MINE = DocIndex("wo:1", "wo", "wo:1", assignee="u1", team="t1", region="r1")
TEAM = DocIndex("wo:2", "wo", "wo:2", assignee="u2", team="t1", region="r1")
REGION = DocIndex("wo:3", "wo", "wo:3", assignee="u3", team="t2", region="r1")
ELSEWHERE = DocIndex("wo:4", "wo", "wo:4", assignee="u4", team="t9", region="r9")
UNASSIGNED = DocIndex("wo:5", "wo", "wo:5", assignee=None, team=None, region=None)


@pytest.mark.parametrize(
    ("who", "scope"),
    [
        (TECH, ScopeFilter(ScopeKind.ASSIGNEE, "u1")),
        (SUPER, ScopeFilter(ScopeKind.TEAM, "t1")),
        (MANAGER, ScopeFilter(ScopeKind.REGION, "r1")),
        (ADMIN, ScopeFilter(ScopeKind.ALL)),
        (NOBODY, ScopeFilter(ScopeKind.NONE)),
        # The widest role wins.
        (principal(Role.TECHNICIAN, Role.SUPERVISOR), ScopeFilter(ScopeKind.TEAM, "t1")),
        (principal(Role.SUPERVISOR, Role.ADMIN), ScopeFilter(ScopeKind.ALL)),
        # A role without its attribute falls back to the next narrower one it holds.
        (principal(Role.SUPERVISOR, team=None), ScopeFilter(ScopeKind.NONE)),
        (
            principal(Role.SUPERVISOR, Role.TECHNICIAN, team=None),
            ScopeFilter(ScopeKind.ASSIGNEE, "u1"),
        ),
        (principal(Role.MANAGER, Role.SUPERVISOR, region=None), ScopeFilter(ScopeKind.TEAM, "t1")),
    ],
)
def test_scope_of(who: Principal, scope: ScopeFilter) -> None:
    assert POLICY.scope(who) == scope


# Which of the documents (and an absent one) each role sees.
SEES: dict[str, tuple[Principal, set[DocIndex | None]]] = {
    "technician": (TECH, {MINE}),
    "supervisor": (SUPER, {MINE, TEAM}),
    "manager": (MANAGER, {MINE, TEAM, REGION}),
    "admin": (ADMIN, {MINE, TEAM, REGION, ELSEWHERE, UNASSIGNED, None}),
    "no role": (NOBODY, set()),
}


@pytest.mark.parametrize("role", SEES)
def test_in_scope(role: str) -> None:
    who, visible = SEES[role]
    scope = POLICY.scope(who)
    for index in (MINE, TEAM, REGION, ELSEWHERE, UNASSIGNED, None):
        assert in_scope(scope, index) == (index in visible), (role, index)


@pytest.mark.parametrize(
    ("who", "doc_type", "index", "allowed"),
    [
        # Work orders: supervisors, managers and admins, inside their scope.
        (TECH, "wo", MINE, False),
        (SUPER, "wo", TEAM, True),
        (SUPER, "wo", REGION, False),
        (MANAGER, "wo", REGION, True),
        (MANAGER, "wo", ELSEWHERE, False),
        (ADMIN, "wo", ELSEWHERE, True),
        (NOBODY, "wo", MINE, False),
        # Forms: whoever sees the work order they belong to.
        (TECH, "form", MINE, True),
        (TECH, "form", TEAM, False),
        (SUPER, "form", TEAM, True),
        (MANAGER, "form", ELSEWHERE, False),
        (ADMIN, "form", ELSEWHERE, True),
        (TECH, "form", None, False),
        (ADMIN, "form", None, False),  # a form needs a work order that exists
        (NOBODY, "form", MINE, False),
        # Nothing else comes into existence through a principal.
        (ADMIN, "ref", None, False),
        (ADMIN, "note", MINE, False),
    ],
)
def test_may_create(who: Principal, doc_type: str, index: DocIndex | None, allowed: bool) -> None:
    assert POLICY.may_create(who, doc_type, index) is allowed


@pytest.mark.parametrize(
    ("who", "doc_type", "paths", "refused"),
    [
        (TECH, "wo", {"fields.status", "notes", "checklist.0.done"}, []),
        (TECH, "wo", {"checklist", "checklist.0.required"}, ["checklist", "checklist.0.required"]),
        (TECH, "wo", {"fields.status", "fields.assignee"}, ["fields.assignee"]),
        (
            TECH,
            "wo",
            {"fields.priority", "fields.due_at", "fields.team"},
            ["fields.due_at", "fields.priority", "fields.team"],
        ),
        (TECH, "wo", {"evil"}, ["evil"]),
        (TECH, "form", {"answers.q1"}, []),
        (TECH, "form", {"meta.wo"}, ["meta.wo"]),
        (SUPER, "wo", {"fields.assignee", "evil"}, []),
        (NOBODY, "wo", {"notes"}, ["notes"]),
    ],
)
def test_field_level_write_rights(
    who: Principal, doc_type: str, paths: set[str], refused: list[str]
) -> None:
    assert POLICY.forbidden_paths(who, doc_type, paths) == refused
    assert POLICY.writes_everything(who, doc_type) is (who in (SUPER, MANAGER, ADMIN))


def test_a_policy_file_overrides_the_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[roles.technician]\nscope = "team"\ncreate = []\n'
        '[roles.technician.write]\nwo = ["fields.*"]\n'
    )
    policy = Policy.load(path)
    assert policy.scope(TECH) == ScopeFilter(ScopeKind.TEAM, "t1")
    assert policy.forbidden_paths(TECH, "wo", {"fields.assignee", "notes"}) == ["notes"]
    assert not policy.may_create(TECH, "form", MINE)
    assert policy.scope(ADMIN) == ScopeFilter(ScopeKind.NONE)  # roles not in the file get nothing


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[roles.wizard]\nscope = 'all'\n", "roles.wizard"),
        ("[roles.admin]\nscope = 'galaxy'\n", "scope"),
        ("[roles.admin]\nscope = 'all'\ncreate = ['invoice']\n", "create"),
        ("[roles.admin]\nscope = 'all'\n[roles.admin.write]\nwo = 'everything'\n", "write.wo"),
        ("[roles.admin]\nscope = 'all'\nsee = 'all'\n", "unknown keys"),
        ("[roles]\n", "no [roles"),
        ("roles = [", "policy.toml"),
    ],
)
def test_a_broken_policy_is_refused_naming_what_is_wrong(
    tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=named.replace("[", r"\[")):
        Policy.load(path)
