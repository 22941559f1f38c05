"""The directory in a running server, against a real slapd: team and region for tokens that lack
them, a deleted person's open socket closed with 4401 and their HTTP refused within a sync, a
moved person's socket rescoped, a team's members for the people who may see them, readiness
and metrics."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fieldsync.adapters import HealthState
from fieldsync.app import ADAPTERS
from fieldsync.auth import DevUser
from tests.adapters.slapd import Slapd, SmallDirectory, table
from tests.harness import USERS, Server, eventually, work_order
from tests.wire import connect

# sid is a supervisor whose token says nothing of a team or region: the directory does.
SID = DevUser("sid", ("supervisor",), None, None, "Sid Supervisor")
TEAMS = {"north": ["sam", "sid", "tina", "tom", "p1", "p2"], "south": ["sue", "ulla"]}


@pytest.fixture
def users() -> Mapping[str, DevUser]:
    return {**USERS, "sid": SID}


@pytest.fixture
def people(make_small: Callable[..., SmallDirectory]) -> SmallDirectory:
    directory = make_small(teams=TEAMS, region="east")
    for uid in TEAMS["south"]:
        directory.set(uid, "st", "west")
    return directory


@pytest.fixture
def server_settings(tmp_path: Path, slapd: Slapd, people: SmallDirectory) -> dict[str, Any]:
    values = table(slapd, people.base, interval_s=0.2, team_source="token_then_directory")
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path = tmp_path / "adapters.toml"
    path.write_text(f'[adapters.people]\nkind = "ldap"\n{lines}\n')
    return {"adapters": str(path)}


async def synced(server: Server) -> None:
    (adapter,) = server.app[ADAPTERS].adapters
    await eventually(lambda: adapter.health().state is HealthState.OK)


async def get(
    http: aiohttp.ClientSession, server: Server, path: str, subject: str
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    async with http.get(server.url + path, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_a_deleted_person_loses_their_socket_and_http_within_a_sync(
    server: Server, people: SmallDirectory, http: aiohttp.ClientSession
) -> None:
    await synced(server)
    token = server.token("tina")
    async with (
        connect(server.sync_url, token) as tina,
        connect(server.sync_url, server.token("tom")) as tom,
    ):
        await tina.hello()
        await tom.hello()
        people.delete("tina")
        assert await tina.closed_with() == (4401, "reauthenticate")
        assert not tom.closed  # everyone else goes on
    async with http.get(
        server.url + "/v1/screens/my-work", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 401
        assert (await response.json(content_type=None))["code"] == "reauthenticate"
    async with connect(server.sync_url, token) as again:
        assert (await again.closed_with())[0] == 4401  # and no new socket either


async def test_team_and_region_come_from_the_directory_and_follow_a_move(
    server: Server, people: SmallDirectory
) -> None:
    await synced(server)
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("sue")) as sue,
    ):
        await sam.hello()
        await sue.hello()
        await sam.update("wo:n1", work_order("wo:n1", team="north").get_update())
        await sam.control("ack", doc="wo:n1")
        south = work_order("wo:s1", team="south", region="west", assignee="ulla", by="sue")
        await sue.update("wo:s1", south.get_update())
        await sue.control("ack", doc="wo:s1")

    async with connect(server.sync_url, server.token("sid")) as sid:
        welcome = await sid.hello()
        assert welcome["principal"]["subject"] == "sid"
        changes = await sid.control("changes")
        assert [doc["id"] for doc in changes["docs"]] == ["wo:n1"]  # north, from the directory

        people.move("sid", "north", "south")
        assert await sid.control("scope", removed=["wo:n1"]) == {
            "type": "scope",
            "added": [],
            "removed": ["wo:n1"],
        }
        assert (await sid.control("scope", removed=[]))["added"] == ["wo:s1"]


async def test_a_teams_members_for_those_who_may_see_them(
    server: Server, people: SmallDirectory, http: aiohttp.ClientSession
) -> None:
    await synced(server)
    status, body = await get(http, server, "/v1/teams/north/members", "sam")
    assert status == 200
    assert [m["subject"] for m in body["items"]] == sorted(TEAMS["north"])
    assert body["items"][0] == {
        "subject": "p1",
        "name": "Person p1",
        "mail": "p1@example.org",
        "region": "east",
        "supervisor": None,
    }
    # sid's team comes from the directory alone.
    assert (await get(http, server, "/v1/teams/north/members", "sid"))[0] == 200

    status, body = await get(http, server, "/v1/teams/north/members?limit=4", "ada")
    assert status == 200
    assert len(body["items"]) == 4
    assert body["next"]
    status, rest = await get(
        http, server, f"/v1/teams/north/members?limit=4&cursor={body['next']}", "ada"
    )
    assert [m["subject"] for m in body["items"] + rest["items"]] == sorted(TEAMS["north"])
    assert rest["next"] is None

    # A manager sees the teams of its region (mia: east), not the others.
    assert (await get(http, server, "/v1/teams/north/members", "mia"))[0] == 200
    for subject, team in (("mia", "south"), ("sue", "north"), ("tina", "north")):
        status, body = await get(http, server, f"/v1/teams/{team}/members", subject)
        assert status == 403, (subject, team)
        assert body["code"] == "forbidden", (subject, team)
    status, body = await get(http, server, "/v1/teams/nowhere/members", "sam")
    assert status == 403


async def test_readiness_and_metrics_tell_the_directory_state(
    server: Server, http: aiohttp.ClientSession
) -> None:
    await synced(server)
    async with http.get(server.url + "/v1/ready") as response:
        ready = await response.json()
    assert ready["adapters"]["people"]["kind"] == "ldap"
    assert ready["adapters"]["people"]["state"] == "ok"
    status, metrics = await get(http, server, "/v1/metrics", "ada")
    assert status == 200
    figures = metrics["adapters"]["people"]
    assert figures["users"] == 8
    assert figures["syncs"] >= 1
    assert (figures["refused_syncs"], figures["errors"]) == (0, 0)
